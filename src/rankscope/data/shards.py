"""Packing documents into fixed-length token shards on disk, and the training stream over them.

Packing: every document's tokens are followed by the EOS id, the documents are concatenated in
order, and the stream is cut into `seq_len`-token sequences; the remainder that cannot fill a
last sequence is dropped. A shard is a raw little-endian array of `(n_sequences, seq_len)` ids
(uint16 when the vocabulary has at most 65536 entries, else uint32), read back as a numpy memmap.

A shard folder holds `train.bin`, `val.bin`, `probe.bin` and `meta.json`. Each `.bin` is
written under a temporary name and renamed into place; `meta.json` (sizes and sha256 of every
file) is written last, the same way, so a folder without it is an interrupted preparation and is
rebuilt, and a folder with it is trusted only after its files match it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rankscope.data import tokenizer as tokenizer_module
from rankscope.errors import ConfigError, DataError
from rankscope.io import read_json, write_json_atomic

log = logging.getLogger("rankscope.data")

META_NAME = "meta.json"
META_VERSION = 1
# Shards up to this size are verified with a full sha256 on every load; larger ones (web-scale
# training shards) with a checksum of their first and last MiB, which still catches truncation
# and most damage without reading gigabytes at start-up.
FULL_CHECK_BYTES = 64 * 1024 * 1024
QUICK_CHECK_SPAN = 1024 * 1024
# Documents are encoded in groups (the Rust tokenizer encodes a group in parallel). Groups start
# small, so reads bounded by max_sequences / max_train_tokens stop early, and double up to a cap
# that bounds memory.
FIRST_GROUP_CHARS = 64_000
MAX_GROUP_CHARS = 4_000_000


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------------------------
# packing


def _grouped(documents: Iterable[str]) -> Iterator[list[str]]:
    group: list[str] = []
    chars = 0
    target = FIRST_GROUP_CHARS
    for doc in documents:
        group.append(doc)
        chars += len(doc)
        if chars >= target:
            yield group
            group, chars = [], 0
            target = min(2 * target, MAX_GROUP_CHARS)
    if group:
        yield group


def token_stream(documents: Iterable[str], tokenizer, eos_id: int) -> Iterator[np.ndarray]:
    """Chunks of the packed token stream: each document's ids followed by EOS, in order."""
    eos = np.array([eos_id], dtype=np.int64)
    for group in _grouped(documents):
        pieces = []
        for ids in tokenizer_module.encode_documents(tokenizer, group):
            pieces.append(np.asarray(ids, dtype=np.int64))
            pieces.append(eos)
        yield np.concatenate(pieces)


@dataclass
class PackResult:
    n_sequences: int
    n_tokens_read: int  # tokens read from the source (including EOS), before the cut


def pack_to_file(
    chunks: Iterable[np.ndarray],
    path: Path,
    seq_len: int,
    dtype: np.dtype,
    max_sequences: int = 0,
    max_tokens: int = 0,
) -> PackResult:
    """Cut the token stream into `seq_len` rows and write them to `path` (atomically).

    Stops reading once `max_sequences` rows are written (0 = no limit) or `max_tokens` tokens
    were read (0 = no limit; the stream is truncated to exactly that many tokens first).
    """
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    limit = np.iinfo(dtype).max
    carry = np.zeros(0, dtype=np.int64)
    written = 0
    read = 0
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                if max_tokens and read + len(chunk) > max_tokens:
                    chunk = chunk[: max_tokens - read]
                read += len(chunk)
                if len(chunk) and int(chunk.max()) > limit:
                    raise DataError(
                        f"the tokenizer produced id {int(chunk.max())}, which does not fit {dtype.name} shards "
                        "sized by its reported length; use another tokenizer"
                    )
                buffer = np.concatenate([carry, chunk]) if len(carry) else chunk
                rows = len(buffer) // seq_len
                if max_sequences:
                    rows = min(rows, max_sequences - written)
                out.write(buffer[: rows * seq_len].astype(dtype).tobytes())
                written += rows
                carry = buffer[rows * seq_len :]
                if (max_sequences and written >= max_sequences) or (max_tokens and read >= max_tokens):
                    break
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed read leaves no stray partial file
        raise
    os.replace(tmp, path)
    return PackResult(written, read)


# ---------------------------------------------------------------------------------------------
# checksums and meta.json


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _quick_checksum(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        h.update(handle.read(QUICK_CHECK_SPAN))
        if size > QUICK_CHECK_SPAN:
            handle.seek(max(QUICK_CHECK_SPAN, size - QUICK_CHECK_SPAN))
            h.update(handle.read())
    return h.hexdigest()


def describe_file(path: Path, n_sequences: int, seq_len: int, dtype: np.dtype) -> dict:
    """The meta.json entry of one shard file."""
    return {
        "file": path.name,
        "n_sequences": n_sequences,
        "seq_len": seq_len,
        "dtype": dtype.name,
        "bytes": path.stat().st_size,
        "sha256": _sha256_file(path),
        "quick_checksum": _quick_checksum(path),
    }


def write_meta(folder: Path, meta: dict) -> None:
    """Write meta.json atomically; it is the last file written, marking the folder complete."""
    write_json_atomic(folder / META_NAME, meta, indent=1, sort_keys=True)


def read_meta(folder: Path) -> dict | None:
    """The folder's meta.json, or None when the preparation never finished."""
    path = folder / META_NAME
    if not path.is_file():
        return None
    meta = read_json(path, expect=dict, fix=f"delete {folder} to rebuild it", error=DataError)
    if meta.get("version") != META_VERSION:
        return None  # written by another version of the format: rebuild
    return meta


def _corrupt(path: Path, why: str, folder: Path) -> DataError:
    return DataError(f"token shard {path} is corrupt/truncated ({why}); delete {folder} to rebuild it")


# ---------------------------------------------------------------------------------------------
# reading


class TokenShards:
    """A read-only memmap of `(n_sequences, seq_len)` token ids; indexing returns LongTensors."""

    def __init__(self, path: Path, n_sequences: int, seq_len: int, dtype: np.dtype):
        self.path = Path(path)
        self.n_sequences = n_sequences
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        if n_sequences:
            self.array = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(n_sequences, seq_len))
        else:
            self.array = np.zeros((0, seq_len), dtype=self.dtype)

    @classmethod
    def open_verified(cls, folder: Path, entry: dict) -> TokenShards:
        """Open the shard file an entry of meta.json describes, checking its size and checksum."""
        path = folder / entry["file"]
        dtype = np.dtype(entry["dtype"])
        if not path.is_file():
            raise _corrupt(path, "file missing", folder)
        size = path.stat().st_size
        expected = entry["n_sequences"] * entry["seq_len"] * dtype.itemsize
        if size != entry["bytes"] or size != expected:
            raise _corrupt(path, f"{size} bytes on disk, meta.json says {entry['bytes']}", folder)
        if size <= FULL_CHECK_BYTES:
            ok = _sha256_file(path) == entry["sha256"]
        else:
            ok = _quick_checksum(path) == entry["quick_checksum"]
        if not ok:
            raise _corrupt(path, "checksum differs from meta.json", folder)
        return cls(path, entry["n_sequences"], entry["seq_len"], dtype)

    def __len__(self) -> int:
        return self.n_sequences

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_sequences, self.seq_len)

    def __getitem__(self, index) -> torch.Tensor:
        rows = np.asarray(self.array[index])
        return torch.from_numpy(rows.astype(np.int64))

    def to_tensor(self) -> torch.Tensor:
        """Every sequence as one LongTensor (for the small val / probe sets)."""
        return self[:]

    def __repr__(self) -> str:
        return f"TokenShards({self.path}, n_sequences={self.n_sequences}, seq_len={self.seq_len}, dtype={self.dtype.name})"


# ---------------------------------------------------------------------------------------------
# the training stream


class TrainStream:
    """Global batches drawn from a seeded permutation of the training sequences, one epoch at a time.

    Epoch `e` visits the sequences in the order `torch.randperm(n, generator=seeded(seed + e))`,
    `batch_size` at a time; the tail of an epoch that cannot fill a global batch is skipped and
    the next epoch begins. With `world_size` processes, rank `r` returns rows
    `[r*b/w, (r+1)*b/w)` of each global batch, so the ranks' batches concatenated in rank order
    are exactly the single-process batch. `state_dict()` holds plain ints; loading it makes the
    stream return the same batches it would have returned without interruption.
    """

    def __init__(self, shards, seed: int, batch_size: int, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside 0..{world_size - 1} (world size {world_size})")
        if batch_size <= 0 or batch_size % world_size:
            raise ConfigError(
                f"train.batch_size ({batch_size}) must be a positive multiple of the number of processes ({world_size})"
            )
        self.shards = shards
        self.n_sequences = len(shards)
        if self.n_sequences < batch_size:
            seq_len = getattr(shards, "seq_len", None) or (shards.shape[1] if hasattr(shards, "shape") else "?")
            raise DataError(
                f"the training split has only {self.n_sequences} sequences at seq_len {seq_len}, fewer than one "
                f"batch of {batch_size}; lower data.seq_len or train.batch_size, or use more data"
            )
        self.seed = int(seed)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = batch_size // world_size
        self.epoch = 0
        self.position = 0  # index into the epoch's permutation of the next global batch
        self._order_epoch = -1
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            generator = torch.Generator().manual_seed((self.seed + self.epoch) % (2**63))
            self._order = torch.randperm(self.n_sequences, generator=generator)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> torch.Tensor:
        """This rank's `(batch_size // world_size, seq_len)` LongTensor of the next global batch."""
        if self.position + self.batch_size > self.n_sequences:
            self.epoch += 1
            self.position = 0
        order = self._epoch_order()
        start = self.position + self.rank * self.local_batch_size
        indices = order[start : start + self.local_batch_size].numpy()
        self.position += self.batch_size
        rows = self.shards[indices]
        return rows if isinstance(rows, torch.Tensor) else torch.as_tensor(np.asarray(rows), dtype=torch.long)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "n_sequences": self.n_sequences}

    def load_state_dict(self, state: dict) -> None:
        n = int(state.get("n_sequences", self.n_sequences))
        if n != self.n_sequences:
            raise DataError(
                f"the saved data stream covered {n} training sequences but the prepared data has "
                f"{self.n_sequences}; resume with the same data config"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
