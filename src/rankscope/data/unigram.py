"""The unigram baseline: the perplexity a model reaches by knowing only token frequencies.

A language model whose validation perplexity is not well below this number has learned little
beyond which tokens are common, so the report prints it next to the runs' perplexities.

Definition (ours; no official code reports it): token probabilities are the training split's
token counts with add-one (Laplace) smoothing over the whole vocabulary,
``p(t) = (count(t) + 1) / (N_train + V)``, so a token never seen in training still has a finite
loss. They are applied to the same positions the validation loss scores: every token of every
validation sequence except the first (a next-token loss has no prediction for position 0).
Perplexity is ``exp`` of the mean negative log-probability over those positions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rankscope.errors import DataError

# Rows of the training shards counted per chunk: bounds memory for web-scale memmaps.
COUNT_CHUNK_ROWS = 65_536


def token_counts(sequences, vocab_size: int) -> np.ndarray:
    """How often each token id occurs in ``sequences`` (a 2-D array, tensor or TokenShards)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    array = getattr(sequences, "array", sequences)  # TokenShards: count the memmap, no int64 copy
    if isinstance(array, torch.Tensor):
        array = array.numpy()
    for start in range(0, len(array), COUNT_CHUNK_ROWS):
        chunk = np.asarray(array[start:start + COUNT_CHUNK_ROWS]).reshape(-1).astype(np.int64)
        if chunk.size and (chunk.min() < 0 or chunk.max() >= vocab_size):
            raise DataError(f"token ids outside [0, {vocab_size}) in the training shards; "
                            "re-prepare the data (delete its shard folder in the cache)")
        counts += np.bincount(chunk, minlength=vocab_size)
    return counts


def unigram_perplexity(train_counts: np.ndarray, val_sequences) -> float:
    """Perplexity of the add-one-smoothed unigram model of ``train_counts`` on the next-token
    positions (all but the first) of ``val_sequences`` (``(n, seq_len)``)."""
    counts = np.asarray(train_counts, dtype=np.float64)
    vocab_size = counts.size
    val = val_sequences.numpy() if isinstance(val_sequences, torch.Tensor) else np.asarray(val_sequences)
    targets = val[:, 1:].reshape(-1).astype(np.int64)
    if targets.size == 0:
        raise DataError("the validation set has no next-token positions (seq_len < 2); raise data.seq_len")
    if targets.min() < 0 or targets.max() >= vocab_size:
        raise DataError(f"validation token ids outside the vocabulary of {vocab_size}; re-prepare the data")
    log_probs = np.log(counts + 1.0) - math.log(counts.sum() + vocab_size)
    return float(math.exp(-log_probs[targets].mean()))


def val_unigram_perplexity(prepared) -> float:
    """The unigram perplexity of a :class:`~rankscope.data.PreparedData`'s validation split,
    from its training split's token counts."""
    return unigram_perplexity(token_counts(prepared.train, prepared.vocab_size), prepared.val)


__all__ = ["token_counts", "unigram_perplexity", "val_unigram_perplexity"]
