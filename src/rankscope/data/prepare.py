"""`prepare_data`: source -> tokenizer -> packed, cached, verified token shards.

The shard folder is `<cache>/shards/<key>/` where the key hashes everything that decides the
tokens (the source's identity, the tokenizer's full definition, seq_len, the val/probe counts,
max_train_tokens). A second run with the same data config finds the folder's meta.json, verifies
the files against it, and skips tokenization entirely.

Inside `require_prepared()` (a study's jobs: the study tokenizes in its prepare stage, in the
driver) a missing tokenizer or shard folder is a DataError at once, never hours of tokenizing on
a GPU node.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rankscope.config import DataConfig
from rankscope.data import shards as shards_module
from rankscope.data import tokenizer as tokenizer_module
from rankscope.data.shards import TokenShards, read_meta, token_dtype, token_stream, write_meta
from rankscope.data.sources import Source, open_source
from rankscope.errors import ConfigError, DataError
from rankscope.locking import file_lock
from rankscope.paths import check_output_folder

log = logging.getLogger("rankscope.data")

# Bump when packing or the shard layout changes: it is part of every shard folder's key.
SHARD_FORMAT_VERSION = 1

_REQUIRE_PREPARED: ContextVar[bool] = ContextVar("rankscope_require_prepared", default=False)


@contextlib.contextmanager
def require_prepared() -> Iterator[None]:
    """Within the block (in this thread), `prepare_data` only loads: a tokenizer or token shards
    that are not in the cache raise DataError instead of being built."""
    token = _REQUIRE_PREPARED.set(True)
    try:
        yield
    finally:
        _REQUIRE_PREPARED.reset(token)


def _not_prepared(what: str, where: Path) -> DataError:
    return DataError(
        f"{what} is not in the token cache ({where}): a study prepares its data in the driver before any job "
        "(`rankscope study FILE --stage prepare`) and its jobs never tokenize; if that ran, this node sees another "
        "cache, so put RANKSCOPE_CACHE on a file system every node shares"
    )


@dataclass
class PreparedData:
    tokenizer: Any  # a transformers fast tokenizer with eos_token_id
    vocab_size: int  # len(tokenizer)
    train: TokenShards  # (n_sequences, seq_len) memmap
    val: torch.Tensor  # LongTensor (val_sequences, seq_len)
    probe: torch.Tensor  # LongTensor (probe_sequences, seq_len)
    fingerprint: str  # hex: data config + tokenizer + token content
    eos_id: int
    shard_dir: Path

    @property
    def seq_len(self) -> int:
        return self.train.seq_len


def resolve_cache_dir(cfg: DataConfig) -> Path:
    """`data.cache_dir`, else $RANKSCOPE_CACHE, else ~/.cache/rankscope; DataError if it cannot be a folder.

    Writability is not required here: a read-only cache that already holds the shards serves.
    """
    env = os.environ.get("RANKSCOPE_CACHE")
    what = "data.cache_dir" if cfg.cache_dir else ("RANKSCOPE_CACHE" if env else "the default cache folder")
    try:
        return check_output_folder(cfg.cache_dir or env or "~/.cache/rankscope", what, writable=False)
    except ConfigError as exc:
        raise DataError(f"{exc} (the token cache)") from None


def load_tokenizer(cfg: DataConfig, source: Source, cache_dir: Path):
    if cfg.tokenizer == "bpe":
        def training_text():  # called only when the BPE is not cached yet
            if _REQUIRE_PREPARED.get():
                raise _not_prepared(f"the BPE tokenizer of {source.description}", cache_dir / "tokenizers")
            return source.documents("train")

        return tokenizer_module.load_or_train_bpe(cache_dir, source.identity, cfg.vocab_size, training_text)
    return tokenizer_module.load_pretrained_tokenizer(cfg.tokenizer)


def shard_key(cfg: DataConfig, source: Source, tokenizer_id: str) -> str:
    fields = {
        "format": SHARD_FORMAT_VERSION,
        "source": source.identity,
        "tokenizer": tokenizer_id,
        "seq_len": cfg.seq_len,
        "val_sequences": cfg.val_sequences,
        "probe_sequences": cfg.probe_sequences,
        "max_train_tokens": cfg.max_train_tokens,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Tokenize and pack `cfg.source` (or load the cached shards) into train / val / probe sets."""
    cache_dir = resolve_cache_dir(cfg)
    source = open_source(cfg)
    tokenizer = load_tokenizer(cfg, source, cache_dir)
    tokenizer_name = "bpe" if cfg.tokenizer == "bpe" else cfg.tokenizer
    eos_id = tokenizer_module.require_eos(tokenizer, tokenizer_name)
    vocab_size = len(tokenizer)
    key = shard_key(cfg, source, tokenizer_module.tokenizer_identity(tokenizer, tokenizer_name))
    folder = cache_dir / "shards" / key[:24]
    with contextlib.ExitStack() as held:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            held.enter_context(file_lock(folder.parent / (folder.name + ".lock")))
        except OSError as exc:
            raise DataError(
                f"cannot write the token cache {cache_dir} ({exc.strerror}); set RANKSCOPE_CACHE to a folder you can write to"
            ) from None
        meta = read_meta(folder)
        if meta is None and _REQUIRE_PREPARED.get():
            raise _not_prepared(f"the token shards of {source.description}", folder)
        if meta is None:
            meta = _build_shards(cfg, source, tokenizer, eos_id, token_dtype(vocab_size), folder, key)
        else:
            log.info("using cached token shards in %s", folder)
        files = meta["files"]
        train = TokenShards.open_verified(folder, files["train"])
        val = TokenShards.open_verified(folder, files["val"]).to_tensor()
        probe = TokenShards.open_verified(folder, files["probe"]).to_tensor()

    content = "".join(files[name]["sha256"] for name in ("train", "val", "probe"))
    fingerprint = hashlib.sha256((key + content).encode()).hexdigest()
    return PreparedData(tokenizer, vocab_size, train, val, probe, fingerprint, eos_id, folder)


def _first_rows(documents, tokenizer, eos_id: int, seq_len: int, n_rows: int) -> np.ndarray:
    """The first `n_rows` packed sequences of `documents` (fewer when the text runs out)."""
    pieces, total = [], 0
    for chunk in token_stream(documents, tokenizer, eos_id):
        pieces.append(chunk)
        total += len(chunk)
        if total >= n_rows * seq_len:
            break
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    rows = min(n_rows, len(tokens) // seq_len)
    return tokens[: rows * seq_len].reshape(rows, seq_len)


def _not_enough(split: str, available: int, cfg: DataConfig, wanted: str, counts: str) -> DataError:
    return DataError(
        f"the {split} text gives only {available} sequences at seq_len {cfg.seq_len}, but {wanted}; "
        f"lower data.seq_len or {counts}"
    )


def _write_rows(folder: Path, name: str, rows: np.ndarray, dtype: np.dtype, seq_len: int) -> dict:
    path = folder / f"{name}.bin"
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(rows.astype(dtype).tobytes())
    os.replace(tmp, path)
    return shards_module.describe_file(path, len(rows), seq_len, dtype)


def _build_shards(cfg: DataConfig, source: Source, tokenizer, eos_id: int, dtype: np.dtype, folder: Path, key: str) -> dict:
    start = time.perf_counter()
    seq_len = cfg.seq_len
    log.info("tokenizing %s into %d-token sequences (cache: %s)", source.description, seq_len, folder)
    # Held-out sets first: they are small, and a too-short split should fail before the long
    # training pass.
    if source.shared_heldout:
        wanted = cfg.val_sequences + cfg.probe_sequences
        rows = _first_rows(source.documents("val"), tokenizer, eos_id, seq_len, wanted)
        if len(rows) < wanted:
            raise _not_enough(
                "validation", len(rows), cfg,
                f"data.val_sequences + data.probe_sequences ask for {cfg.val_sequences} + {cfg.probe_sequences}",
                "those counts",
            )
        val_rows, probe_rows = rows[: cfg.val_sequences], rows[cfg.val_sequences :]
    else:
        val_rows = _first_rows(source.documents("val"), tokenizer, eos_id, seq_len, cfg.val_sequences)
        if len(val_rows) < cfg.val_sequences:
            raise _not_enough("val", len(val_rows), cfg, f"data.val_sequences asks for {cfg.val_sequences}", "data.val_sequences")
        probe_rows = _first_rows(source.documents("probe"), tokenizer, eos_id, seq_len, cfg.probe_sequences)
        if len(probe_rows) < cfg.probe_sequences:
            raise _not_enough("probe", len(probe_rows), cfg, f"data.probe_sequences asks for {cfg.probe_sequences}", "data.probe_sequences")

    result = shards_module.pack_to_file(
        token_stream(source.documents("train"), tokenizer, eos_id),
        folder / "train.bin", seq_len, dtype, max_tokens=cfg.max_train_tokens,
    )
    if result.n_sequences == 0:
        raise DataError(
            f"the training text gives 0 sequences at seq_len {cfg.seq_len} ({result.n_tokens_read} tokens); "
            "lower data.seq_len, raise data.max_train_tokens, or use more data"
        )
    files = {
        "train": shards_module.describe_file(folder / "train.bin", result.n_sequences, seq_len, dtype),
        "val": _write_rows(folder, "val", val_rows, dtype, seq_len),
        "probe": _write_rows(folder, "probe", probe_rows, dtype, seq_len),
    }
    meta = {
        "version": shards_module.META_VERSION,
        "key": key,
        "source": source.identity,
        "seq_len": seq_len,
        "dtype": dtype.name,
        "eos_id": eos_id,
        "vocab_size": len(tokenizer),
        "train_tokens_read": result.n_tokens_read,
        "files": files,
    }
    write_meta(folder, meta)  # last: its presence marks the folder complete
    log.info(
        "prepared %d train / %d val / %d probe sequences of %d tokens in %.1f s",
        result.n_sequences, len(val_rows), len(probe_rows), seq_len, time.perf_counter() - start,
    )
    return meta


def check_vocab(prepared: PreparedData, model_vocab_size: int) -> None:
    """DataError when the tokenizer can produce ids the model's embedding has no row for."""
    if prepared.vocab_size > model_vocab_size:
        raise DataError(
            f"the tokenizer has {prepared.vocab_size} token ids but the model's vocab_size is {model_vocab_size}; "
            f"set model.overrides.vocab_size to at least {prepared.vocab_size} or use another tokenizer"
        )
