"""Tokenizers: a byte-level BPE trained on the source's training text, or any AutoTokenizer.

`tokenizer: bpe` trains a byte-level BPE (HF `tokenizers`) with `vocab_size` entries whose only
special token is `</s>` (end of document, also used for padding). It is trained once per
(source, vocab size) and cached as a `save_pretrained` folder under
`<cache>/tokenizers/<key>/`, so later runs load it instead of training. Any other value is handed
to `transformers.AutoTokenizer.from_pretrained`: a local folder, or a hub name that is in the
HF cache (or downloadable when online).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from rankscope.errors import DataError
from rankscope.io import write_json_atomic
from rankscope.locking import file_lock

log = logging.getLogger("rankscope.data")

EOS_TOKEN = "</s>"
# Bump when the BPE recipe below changes: it is part of the tokenizer cache key.
BPE_RECIPE_VERSION = 1
# The BPE learns its merges from at most this many characters of training text. The embedded
# corpus (4.4 MB) is used whole; for web-scale sources this keeps training to about a minute.
BPE_MAX_TRAIN_CHARS = 64 * 1024 * 1024


def bpe_cache_key(source_identity: str, vocab_size: int) -> str:
    """The folder name of the cached BPE for this source and vocabulary size."""
    text = json.dumps(
        {"source": source_identity, "vocab_size": vocab_size, "recipe": BPE_RECIPE_VERSION,
         "max_chars": BPE_MAX_TRAIN_CHARS},
        sort_keys=True,
    )
    return f"bpe{vocab_size}-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _bounded(documents: Iterable[str], max_chars: int) -> Iterator[str]:
    total = 0
    for doc in documents:
        if total >= max_chars:
            return
        doc = doc[: max_chars - total]
        total += len(doc)
        yield doc


def train_bpe(documents: Iterable[str], vocab_size: int):
    """Train a byte-level BPE on `documents`; returns a `PreTrainedTokenizerFast` with EOS = pad = `</s>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257 + 1:
        # A byte-level BPE needs its 256-byte alphabet plus `</s>` before it can learn merges.
        raise DataError(f"data.vocab_size {vocab_size} is too small for a byte-level BPE; use at least 258")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_bounded(documents, BPE_MAX_TRAIN_CHARS), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def load_or_train_bpe(cache_dir: Path, source_identity: str, vocab_size: int, documents_factory):
    """The cached BPE for this source, training (and caching) it first when it is missing.

    `documents_factory()` returns an iterable of training documents; it is only called on a miss.
    """
    from transformers import PreTrainedTokenizerFast

    folder = cache_dir / "tokenizers" / bpe_cache_key(source_identity, vocab_size)
    done_marker = folder / "rankscope_tokenizer.json"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.parent / (folder.name + ".lock")):
        if not done_marker.is_file():
            start = time.perf_counter()
            log.info("training a byte-level BPE (vocab %d) on the training text", vocab_size)
            tokenizer = train_bpe(documents_factory(), vocab_size)
            if len(tokenizer) < vocab_size:
                log.warning(
                    "the BPE stopped at %d tokens (< data.vocab_size %d): the training text has no more merges",
                    len(tokenizer), vocab_size,
                )
            # Save to a temporary folder and move it into place, so a crash never leaves a
            # half-written tokenizer that looks complete.
            tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tokenizer.save_pretrained(tmp)
            write_json_atomic(tmp / "rankscope_tokenizer.json", {"source": source_identity, "vocab_size": vocab_size},
                              indent=1)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
            log.info("BPE trained in %.1f s and cached in %s", time.perf_counter() - start, folder)
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    except Exception as exc:  # a damaged cache folder: say how to rebuild it
        raise DataError(f"cached tokenizer {folder} cannot be loaded ({type(exc).__name__}); delete it to retrain") from None
    return tokenizer


def load_pretrained_tokenizer(name_or_path: str):
    """`AutoTokenizer.from_pretrained(name_or_path)`, with a DataError that names the fixes."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"tokenizer {name_or_path!r} cannot be loaded ({reason[:200]}); use data.tokenizer=bpe "
            "or a local tokenizer folder, or go online once so the HF cache has it"
        ) from None
    return tokenizer


def require_eos(tokenizer, name: str) -> int:
    """The tokenizer's EOS id (documents are separated by it), or DataError."""
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise DataError(
            f"tokenizer {name!r} has no EOS token, which separates documents; use data.tokenizer=bpe "
            "or a tokenizer that defines eos_token"
        )
    return int(eos_id)


def tokenizer_identity(tokenizer, name: str) -> str:
    """A hash of everything that decides the token ids: the backend's full JSON, or the vocab."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow (pure Python) tokenizer: its vocabulary and name stand in for it
        h.update(name.encode())
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "eos_token_id", None)).encode())
    return h.hexdigest()


def encode_documents(tokenizer, documents: list[str]) -> list[list[int]]:
    """Token ids of each document, without special tokens and never truncated."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The Rust backend encodes the batch in parallel; a tokenizer.json may carry truncation
        # or padding settings, which would silently cut documents, so they are switched off.
        if backend.truncation is not None or backend.padding is not None:
            backend.no_truncation()
            backend.no_padding()
        return [enc.ids for enc in backend.encode_batch(documents, add_special_tokens=False)]
    return tokenizer(documents, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
