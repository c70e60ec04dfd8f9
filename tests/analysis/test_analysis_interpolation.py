"""Known-answer tests for rankscope.analysis.interpolation."""

from __future__ import annotations

import pytest
import torch

from rankscope.analysis import AnalysisError
from rankscope.analysis import interpolation as I


def test_barrier_of_a_convex_path_is_not_positive():
    alphas = I.interpolation_alphas(21)
    bowl = 2.0 + (alphas - 0.5) ** 2  # convex, equal ends: every interior point is below them
    assert I.barrier(bowl) == pytest.approx(2.0 + 0.45**2 - 2.25)
    assert I.barrier(bowl) < 0.0 and I.relative_barrier(bowl) < 0.0
    # METRICS.md measures from the mean of the ends (not from the chord), so a convex path with
    # unequal ends can reach above that mean, by at most half the difference of the ends.
    tilted = 2.0 + (alphas - 0.3) ** 2
    assert 0.0 < I.barrier(tilted) <= 0.5 * abs(tilted[-1] - tilted[0]).item()
    assert I.barrier(tilted) == pytest.approx(tilted[-2].item() - 0.5 * (tilted[0] + tilted[-1]).item())
    # A straight path: the interior maximum is L(0.95).
    assert I.barrier(1.0 + alphas) == pytest.approx(1.95 - 1.5)


def test_barrier_of_a_bump_equals_its_height():
    alphas = I.interpolation_alphas(21)
    base = torch.full((21,), 3.0, dtype=torch.float64)
    bump = base + 0.7 * torch.exp(-((alphas - 0.5) ** 2) / 0.01)  # peak 0.7 at α = 0.5, ends ≈ 0
    ends = 0.5 * (bump[0] + bump[-1])
    assert I.barrier(bump) == pytest.approx((3.7 - ends).item(), rel=1e-12)
    assert I.relative_barrier(bump) == pytest.approx(((3.7 - ends) / ends).item(), rel=1e-12)
    # Unequal ends: the barrier is measured from their mean.
    path = [1.0, 4.0, 2.5, 3.0]
    assert I.barrier(path) == pytest.approx(4.0 - 2.0)
    assert I.relative_barrier(path) == pytest.approx(2.0 / 2.0)


def test_barrier_is_vectorised_over_paths():
    paths = torch.tensor([[1.0, 2.0, 1.0], [1.0, 0.5, 3.0]])
    assert I.barrier(paths).tolist() == pytest.approx([1.0, 0.5 - 2.0])


def test_barrier_needs_an_interior_point():
    with pytest.raises(ValueError):
        I.barrier([1.0, 2.0])
    with pytest.raises(AnalysisError):
        I.interpolation_alphas(2)


def test_interpolation_returns_each_end_exactly_and_is_linear_between():
    g = torch.Generator().manual_seed(0)
    theta_a = {"w": torch.randn(5, 4, generator=g).to(torch.bfloat16), "b": torch.randn(4, generator=g)}
    theta_b = {"w": torch.randn(5, 4, generator=g).to(torch.bfloat16), "b": torch.randn(4, generator=g)}
    at_a = I.interpolate(theta_a, theta_b, 0.0)
    at_b = I.interpolate(theta_a, theta_b, 1.0)
    for name in theta_a:
        assert at_a[name].dtype == torch.float32
        assert torch.equal(at_a[name], theta_a[name].float())
        assert torch.equal(at_b[name], theta_b[name].float())
    mid = I.interpolate(theta_a, theta_b, 0.25)
    expected = 0.75 * theta_a["w"].double() + 0.25 * theta_b["w"].double()
    assert torch.allclose(mid["w"].double(), expected, atol=1e-6)
    # Every α is computed from the ends: sweeping the path and returning to α = 0 gives θ_a back.
    for alpha in I.interpolation_alphas(21).tolist():
        I.interpolate(theta_a, theta_b, alpha)
    assert torch.equal(I.interpolate(theta_a, theta_b, 0.0)["b"], theta_a["b"])
    assert I.interpolate(theta_a, theta_b, 0.5, out_dtype=torch.bfloat16)["w"].dtype == torch.bfloat16


def test_interpolation_rejects_mismatched_parameter_sets():
    a = {"w": torch.zeros(2, 2)}
    with pytest.raises(AnalysisError):
        I.interpolate(a, {"v": torch.zeros(2, 2)}, 0.5)
    with pytest.raises(AnalysisError):
        I.interpolate(a, {"w": torch.zeros(2, 3)}, 0.5)
    steps_a, steps_b = {"n": torch.tensor([3])}, {"n": torch.tensor([4])}
    with pytest.raises(AnalysisError):
        I.interpolate(steps_a, steps_b, 0.5)
    assert torch.equal(I.interpolate(steps_a, dict(steps_a), 0.5)["n"], torch.tensor([3]))
