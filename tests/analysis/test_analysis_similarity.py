"""Known-answer tests for rankscope.analysis.similarity."""

from __future__ import annotations

import math

import pytest
import torch

from rankscope.analysis import AnalysisError
from rankscope.analysis import similarity as M


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(randn(n, n, seed=seed, dtype=torch.float64))
    return q


def kernel_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Dense reference: CKA from N × N linear kernels, HSIC(K, L) = tr(K H L H)."""
    X, Y = X.double(), Y.double()
    n = X.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, L = X @ X.T, Y @ Y.T
    hsic = lambda A, B: torch.trace(A @ H @ B @ H)  # noqa: E731
    return (hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L))).item()


def test_cka_of_a_representation_with_itself_is_one():
    X = randn(50, 12, seed=1)
    assert M.linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)


def test_cka_matches_the_kernel_form():
    X, Y = randn(40, 6, seed=2), randn(40, 9, seed=3)
    Y = Y + 0.5 * X @ randn(6, 9, seed=4)  # correlated, so the value is not trivially small
    assert M.linear_cka(X, Y) == pytest.approx(kernel_cka(X, Y), rel=1e-10)


def test_cka_is_invariant_to_orthogonal_maps_isotropic_scaling_and_translation():
    X, Y = randn(60, 8, seed=5, dtype=torch.float64), randn(60, 8, seed=6, dtype=torch.float64)
    Y = Y + X  # share some structure
    base = M.linear_cka(X, Y)
    Qx, Qy = random_orthogonal(8, 7), random_orthogonal(8, 8)
    assert M.linear_cka(X @ Qx, Y) == pytest.approx(base, rel=1e-10)
    assert M.linear_cka(X, Y @ Qy) == pytest.approx(base, rel=1e-10)
    assert M.linear_cka(3.0 * X, Y) == pytest.approx(base, rel=1e-10)
    assert M.linear_cka(X, 0.01 * Y) == pytest.approx(base, rel=1e-10)
    assert M.linear_cka(X + 7.0, Y - 2.0) == pytest.approx(base, rel=1e-10)
    # ...but not to an anisotropic rescaling of the features.
    assert abs(M.linear_cka(X * torch.linspace(0.1, 10, 8, dtype=torch.float64), Y) - base) > 1e-3


def test_cka_of_independent_features_is_small():
    X, Y = randn(4000, 8, seed=9), randn(4000, 8, seed=10)
    assert M.linear_cka(X, Y) < 0.02
    assert M.linear_cka(X, X @ random_orthogonal(8, 11).float()) == pytest.approx(1.0, abs=1e-6)


def test_cosine_and_l2_on_constructed_rows():
    X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    assert M.cosine(X, X) == pytest.approx(1.0)
    assert M.cosine(X, -2.0 * X) == pytest.approx(-1.0)
    assert M.l2(X, X) == 0.0
    assert M.relative_l2(X, X) == 0.0
    Y = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    # cosines: 1/√2, 0, and 0 for a zero row (clamped, never nan)
    assert M.cosine(X, Y) == pytest.approx((1 / math.sqrt(2)) / 3)
    # distances: 1, √8, 5; mean row norm of X (the reference): (1 + 2 + 5) / 3
    assert M.l2(X, Y) == pytest.approx((1 + math.sqrt(8) + 5) / 3)
    assert M.relative_l2(X, Y) == pytest.approx((1 + math.sqrt(8) + 5) / (1 + 2 + 5))


def test_masking_drops_rows_and_accepts_batch_time_layout():
    X, Y = randn(6, 5, 4, seed=12), randn(6, 5, 4, seed=13)
    mask = randn(6, 5, seed=14) > 0
    rows_x, rows_y = X[mask], Y[mask]
    # Garbage in the masked positions must not matter.
    X_dirty, Y_dirty = X.clone(), Y.clone()
    X_dirty[~mask] = 1e6
    Y_dirty[~mask] = -3e5
    for fn in (M.linear_cka, M.cosine, M.l2, M.relative_l2):
        expected = fn(rows_x, rows_y)
        assert fn(X_dirty, Y_dirty, mask=mask) == pytest.approx(expected, rel=1e-10)
        assert fn(X_dirty.reshape(30, 4), Y_dirty.reshape(30, 4), mask=mask.reshape(30)) == pytest.approx(
            expected, rel=1e-10
        )
    # Without the mask the padding does count (the study's unmasked behaviour).
    assert M.l2(X_dirty, Y_dirty) != pytest.approx(M.l2(rows_x, rows_y))


def test_similarity_accumulator_equals_one_shot_functions():
    X, Y = randn(5, 7, 6, seed=15), randn(5, 7, 6, seed=16)
    Y = 0.3 * Y + X
    mask = randn(5, 7, seed=17) > -0.5
    acc = M.SimilarityAccumulator()
    for b in range(5):  # one sequence per batch, uneven numbers of kept rows
        acc.update(X[b], Y[b], mask=mask[b])
    result = acc.result()
    assert result["count"] == int(mask.sum())
    assert result["cka"] == pytest.approx(M.linear_cka(X, Y, mask), rel=1e-10)
    assert result["cosine"] == pytest.approx(M.cosine(X, Y, mask), rel=1e-10)
    assert result["l2"] == pytest.approx(M.l2(X, Y, mask), rel=1e-10)
    assert result["relative_l2"] == pytest.approx(M.relative_l2(X, Y, mask), rel=1e-10)


def test_cka_accumulator_handles_different_widths_and_large_offsets():
    # Hidden states with a large shared offset: naive XᵀX − nμμᵀ would lose digits here.
    X = randn(300, 5, seed=18, dtype=torch.float64) + 1e5
    Y = randn(300, 3, seed=19, dtype=torch.float64) - 4e4
    Y[:, 0] += 0.5 * (X[:, 0] - 1e5)
    acc = M.CKAAccumulator()
    for chunk in range(0, 300, 70):
        acc.update(X[chunk : chunk + 70], Y[chunk : chunk + 70])
    assert acc.cka() == pytest.approx(M.linear_cka(X - 1e5, Y + 4e4), rel=1e-9)


def test_bad_inputs_raise():
    X = randn(4, 3)
    with pytest.raises(AnalysisError):
        M.cosine(X, randn(4, 2))  # widths differ
    with pytest.raises(AnalysisError):
        M.linear_cka(X, randn(5, 3))  # rows differ
    with pytest.raises(AnalysisError):
        M.l2(X, X, mask=torch.zeros(4, dtype=torch.bool))  # nothing left
    with pytest.raises(AnalysisError):
        M.l2(X, X, mask=torch.ones(4))  # not boolean
    with pytest.raises(ValueError):
        M.SimilarityAccumulator().cka()  # no rows fed yet
    acc = M.CKAAccumulator()
    acc.update(X, X)
    with pytest.raises(AnalysisError):
        acc.update(randn(4, 5), X)
