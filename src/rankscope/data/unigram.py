"""The unigram baseline of a prepared data set: the perplexity of a model that ignores context.

A language model that has learned anything must beat it. Token frequencies are counted on the
training split (add-one smoothed over the vocabulary, so a token unseen in training keeps a
finite cost) and scored on the very targets the validation loss averages over: every position
after the first of every validation sequence.
"""

from __future__ import annotations

import math

import numpy as np

from rankscope.data.prepare import PreparedData

# Counting stops after this many training tokens (a C4-sized corpus has billions; the estimate
# is stable long before), and says so.
MAX_COUNT_TOKENS = 50_000_000


def unigram_perplexity(data: PreparedData, max_tokens: int = MAX_COUNT_TOKENS) -> dict[str, float | int]:
    """{"loss", "ppl", "train_tokens" (counted), "val_tokens", "vocab_size"} of the add-one unigram model."""
    vocab = int(data.vocab_size)
    counts = np.zeros(vocab, dtype=np.int64)
    counted = 0
    array = data.train.array
    rows_per_chunk = max(1, 4_000_000 // max(1, data.train.seq_len))
    for start in range(0, array.shape[0], rows_per_chunk):
        chunk = np.asarray(array[start:start + rows_per_chunk]).reshape(-1)
        counts += np.bincount(chunk, minlength=vocab)[:vocab]
        counted += chunk.size
        if counted >= max_tokens:
            break
    log_probs = np.log(counts + 1.0) - math.log(counted + vocab)
    targets = data.val[:, 1:].reshape(-1).numpy()
    loss = float(-log_probs[targets].mean())
    return {"loss": loss, "ppl": math.exp(loss), "train_tokens": int(counted), "val_tokens": int(targets.size),
            "vocab_size": vocab}
