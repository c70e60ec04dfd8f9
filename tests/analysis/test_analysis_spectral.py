"""Known-answer tests for rankscope.analysis.spectral."""

from __future__ import annotations

import math

import pytest
import torch

from rankscope.analysis import AnalysisError
from rankscope.analysis import spectral as S
from rankscope.errors import RankscopeError


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def with_spectrum(sigmas: list[float], m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A dense m × n matrix U diag(σ) Vᵀ with random orthogonal U, V: known singular values."""
    U = random_orthogonal(m, seed)[:, : len(sigmas)]
    V = random_orthogonal(n, seed + 1)[:, : len(sigmas)]
    return U @ torch.diag(torch.tensor(sigmas, dtype=torch.float64)) @ V.T


def test_effective_rank_of_flat_spectrum_is_its_length():
    for n in (1, 4, 9):
        W = with_spectrum([2.5] * n, 12, 10, seed=n)
        assert S.effective_rank(W) == pytest.approx(n, rel=1e-10)


def test_effective_rank_of_rank_one_matrix_is_one():
    g = torch.Generator().manual_seed(3)
    # fp64: a rank-1 matrix rounded to fp32 has noise singular values ~1e-7·σ_1 above the 1e-12 cut.
    u = torch.randn(7, generator=g, dtype=torch.float64)
    v = torch.randn(5, generator=g, dtype=torch.float64)
    assert S.effective_rank(torch.outer(u, v)) == pytest.approx(1.0, abs=1e-9)


def test_effective_rank_of_known_spectrum_matches_entropy_formula():
    sigmas = [3.0, 2.0, 1.0, 0.5]
    total = sum(sigmas)
    entropy = -sum((s / total) * math.log(s / total) for s in sigmas)
    W = with_spectrum(sigmas, 6, 8)
    assert S.effective_rank(W) == pytest.approx(math.exp(entropy), rel=1e-10)
    assert S.spectral_summary(W)["effective_rank_normalized"] == pytest.approx(math.exp(entropy) / 6, rel=1e-10)


def test_stable_rank_and_spectral_gap_of_diagonal_matrices():
    W = torch.diag(torch.tensor([4.0, 2.0, 1.0]))
    assert S.stable_rank(W) == pytest.approx((16 + 4 + 1) / 16)
    assert S.spectral_gap(W) == pytest.approx((4 - 2) / 4)
    # Rectangular, with a diagonal that is not sorted: the metrics use the sorted spectrum.
    R = torch.zeros(3, 5)
    R[0, 0], R[1, 1], R[2, 2] = 1.0, 5.0, 3.0
    assert S.stable_rank(R) == pytest.approx((1 + 25 + 9) / 25)
    assert S.spectral_gap(R) == pytest.approx((5 - 3) / 5)
    # Equal top values: no gap; rank one: full gap.
    assert S.spectral_gap(torch.diag(torch.tensor([2.0, 2.0, 1.0]))) == pytest.approx(0.0, abs=1e-12)
    assert S.spectral_gap(torch.diag(torch.tensor([2.0, 0.0, 0.0]))) == pytest.approx(1.0)


def test_count_above_is_strict_and_uses_the_threshold():
    W = torch.diag(torch.tensor([0.5, 0.2, 0.1, 0.05], dtype=torch.float64))
    assert S.count_above(W) == 2  # 0.1 itself is not above 0.1
    assert S.count_above(W, threshold=0.01) == 4
    assert S.count_above(W, threshold=1.0) == 0
    summary = S.spectral_summary(W, threshold=0.01)
    assert summary["count_above"] == 4 and summary["count_above_normalized"] == pytest.approx(1.0)


def test_singular_values_drop_numerical_zeros_and_are_fp64_descending():
    W = torch.diag(torch.tensor([1e-14, 3.0, 1.0, 0.0], dtype=torch.float64))
    sv = S.singular_values(W)
    assert sv.dtype == torch.float64
    assert sv.tolist() == pytest.approx([3.0, 1.0])
    # The normalized variants still divide by min(m, n), not by the number kept.
    summary = S.spectral_summary(W)
    assert summary["num_singular_values"] == 2
    assert summary["effective_rank_normalized"] == pytest.approx(summary["effective_rank"] / 4)


def test_metrics_match_dense_reference_svd_on_random_matrix():
    g = torch.Generator().manual_seed(11)
    W = torch.randn(9, 6, generator=g)
    sv = torch.linalg.svdvals(W.double())
    p = sv / sv.sum()
    summary = S.spectral_summary(W, threshold=1.0)
    assert summary["effective_rank"] == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-10)
    assert summary["stable_rank"] == pytest.approx(((sv**2).sum() / sv[0] ** 2).item(), rel=1e-10)
    assert summary["spectral_gap"] == pytest.approx(((sv[0] - sv[1]) / sv[0]).item(), rel=1e-10)
    assert summary["count_above"] == int((sv > 1.0).sum())
    assert summary["sigma_max"] == pytest.approx(sv[0].item())
    assert summary["frobenius_norm"] == pytest.approx(torch.linalg.norm(W.double()).item(), rel=1e-10)


def test_batch_matches_one_matrix_at_a_time():
    g = torch.Generator().manual_seed(5)
    batch = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    batch[2] = torch.outer(torch.randn(6, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64))
    batched = S.spectral_summary(batch, threshold=0.5)
    assert batched["effective_rank"].shape == (4,)
    for i in range(4):
        single = S.spectral_summary(batch[i], threshold=0.5)
        for key, value in single.items():
            assert batched[key][i].item() == pytest.approx(value, rel=1e-10, abs=1e-12), key


def test_from_sv_helpers_accept_unsorted_values_and_ignore_numerical_zeros():
    sv = torch.tensor([1.0, 4.0, 1e-13, 2.0], dtype=torch.float64)
    W = torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
    assert S.effective_rank_from_sv(sv) == pytest.approx(S.effective_rank(W))
    assert S.stable_rank_from_sv(sv) == pytest.approx(S.stable_rank(W))
    assert S.spectral_gap_from_sv(sv) == pytest.approx(S.spectral_gap(W))
    assert S.count_above_from_sv(sv, 1.5) == 2
    assert S.spectral_summary_from_sv(sv, min_dim=3) == pytest.approx(S.spectral_summary(W))


def test_zero_matrix_reports_zero_for_every_metric_as_the_study_does():
    # Study (5_ranks.py, _metrics_from_singular_values): no σ above the tolerance -> every metric 0.
    summary = S.spectral_summary(torch.zeros(4, 3))
    for key in ("effective_rank", "stable_rank", "count_above", "numerical_rank", "spectral_gap", "sv_ratio"):
        assert summary[key] == 0, key
    # Our variant keeps the undefined ratios undefined.
    ours = S.spectral_summary(torch.zeros(4, 3), undefined=float("nan"))
    assert math.isnan(ours["spectral_gap"]) and math.isnan(ours["sv_ratio"]) and ours["effective_rank"] == 0
    # In a batch, the zero matrix does not disturb its neighbour.
    batch = S.spectral_summary(torch.stack([torch.zeros(3, 3), torch.diag(torch.tensor([2.0, 1.0, 0.0]))]))
    assert batch["spectral_gap"].tolist() == [0.0, 0.5] and batch["sv_ratio"].tolist() == [0.0, 0.5]


def test_numerical_rank_of_a_constructed_matrix():
    # U diag(σ) Vᵀ with 4 non-zero singular values spanning 1e3 .. 1e-9: all 4 are above the
    # study's absolute tolerance 1e-12, the 3 exact zeros are not.
    W = with_spectrum([1e3, 1.0, 1e-3, 1e-9], 9, 7, seed=11)
    summary = S.spectral_summary(W)
    assert summary["numerical_rank"] == 4 and S.numerical_rank(W) == 4
    assert summary["numerical_rank_normalized"] == pytest.approx(4 / 7)
    assert S.numerical_rank(W, tol=1e-6) == 3  # the tolerance is a setting
    assert S.numerical_rank(torch.zeros(5, 5)) == 0
    # Integer rank-2 matrix built from exact products: rank 2 whatever the shape.
    M = torch.outer(torch.arange(1.0, 7.0), torch.ones(4)) + torch.outer(torch.ones(6), torch.arange(0.0, 4.0) ** 2)
    assert S.numerical_rank(M.double()) == 2


def test_sv_ratio_is_the_second_over_the_first_singular_value():
    W = with_spectrum([5.0, 2.0, 1.0], 6, 4, seed=3)
    summary = S.spectral_summary(W)
    assert summary["sv_ratio"] == pytest.approx(2.0 / 5.0, rel=1e-12)
    assert summary["spectral_gap"] == pytest.approx(1.0 - summary["sv_ratio"], rel=1e-12)
    assert S.sv_ratio_from_sv(torch.tensor([3.0])) == 0.0  # rank one: σ₂ = 0


def test_delta_summary_describes_the_update():
    g = torch.Generator().manual_seed(2)
    W_prev = torch.randn(8, 6, generator=g, dtype=torch.float64)
    u = torch.randn(8, generator=g, dtype=torch.float64)
    v = torch.randn(6, generator=g, dtype=torch.float64)
    W_next = W_prev + 0.01 * torch.outer(u, v)  # a rank-1 update
    out = S.delta_summary(W_prev, W_next)
    delta = W_next - W_prev
    assert out["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert out["stable_rank"] == pytest.approx(1.0, abs=1e-6)
    assert out["delta_frobenius"] == pytest.approx(torch.linalg.norm(delta).item(), rel=1e-12)
    assert out["relative_delta_frobenius"] == pytest.approx(
        (torch.linalg.norm(delta) / torch.linalg.norm(W_prev)).item(), rel=1e-12
    )
    assert out["frobenius_norm"] == pytest.approx(out["delta_frobenius"], rel=1e-10)
    batched = S.delta_summary(torch.stack([W_prev, W_prev]), torch.stack([W_next, W_prev]))
    assert batched["delta_frobenius"][1].item() == 0.0 and batched["effective_rank"][1].item() == 0.0


def test_delta_of_bf16_weights_is_taken_in_fp64():
    g = torch.Generator().manual_seed(4)
    W_prev = (10 + torch.randn(16, 16, generator=g)).to(torch.bfloat16)
    W_next = (W_prev.float() + 0.05 * torch.randn(16, 16, generator=g)).to(torch.bfloat16)
    exact = torch.linalg.norm(W_next.double() - W_prev.double()).item()
    assert exact > 0
    assert S.delta_summary(W_prev, W_next)["delta_frobenius"] == pytest.approx(exact, rel=1e-12)


def test_bad_inputs_raise_a_value_error_that_is_a_rankscope_error():
    with pytest.raises(ValueError):
        S.effective_rank(torch.ones(5))
    with pytest.raises(RankscopeError):
        S.delta_summary(torch.ones(2, 3), torch.ones(3, 2))
    with pytest.raises(AnalysisError):
        S.spectral_summary_from_sv(torch.ones(3), min_dim=0)
