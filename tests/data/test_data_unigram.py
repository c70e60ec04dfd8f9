"""The unigram baseline perplexity against hand-worked answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rankscope.data import unigram
from rankscope.data.shards import TokenShards
from rankscope.errors import DataError


def test_hand_worked_example():
    # Train ids 0, 0, 1, 2 over a vocabulary of 4: counts (2, 1, 1, 0), N = 4, so with add-one
    # smoothing p = (3, 2, 2, 1) / 8. The validation sequence (2, 0, 3) scores positions 1 and 2,
    # tokens 0 and 3: perplexity = (3/8 · 1/8)^(-1/2) = sqrt(64 / 3).
    counts = unigram.token_counts(np.array([[0, 0], [1, 2]]), vocab_size=4)
    assert counts.tolist() == [2, 1, 1, 0]
    ppl = unigram.unigram_perplexity(counts, torch.tensor([[2, 0, 3]]))
    assert ppl == pytest.approx(math.sqrt(64 / 3), rel=1e-12)


def test_uniform_counts_give_the_vocabulary_size():
    counts = np.full(50, 7)
    val = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    assert unigram.unigram_perplexity(counts, val) == pytest.approx(50.0, rel=1e-12)


def test_counts_of_a_memmap_in_chunks_equal_bincount(tmp_path, monkeypatch):
    rows = np.random.default_rng(0).integers(0, 300, size=(11, 16)).astype(np.uint16)
    path = tmp_path / "train.bin"
    path.write_bytes(rows.tobytes())
    monkeypatch.setattr(unigram, "COUNT_CHUNK_ROWS", 3)  # several chunks and a short last one
    counts = unigram.token_counts(TokenShards(path, 11, 16, np.uint16), vocab_size=300)
    assert counts.tolist() == np.bincount(rows.reshape(-1).astype(np.int64), minlength=300).tolist()


def test_ids_outside_the_vocabulary_are_a_data_error():
    with pytest.raises(DataError, match="outside"):
        unigram.token_counts(np.array([[0, 5]]), vocab_size=4)
    with pytest.raises(DataError, match="outside the vocabulary"):
        unigram.unigram_perplexity(np.ones(4), torch.tensor([[0, 4]]))
    with pytest.raises(DataError, match="seq_len"):
        unigram.unigram_perplexity(np.ones(4), torch.tensor([[0]]))
