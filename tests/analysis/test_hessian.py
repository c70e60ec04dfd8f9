"""Known answers for the Hessian estimators: a quadratic with a known Hessian (through a real
double-backward HVP), the algebraic extremes of indefinite Hessians against dense eigvalsh (and
ARPACK), a budget too small, Hutchinson's exactness on a diagonal Hessian and its standard-error
rule, and HVPs of a real low-rank model against central differences of its gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rankscope import methods
from rankscope.analysis import AnalysisError
from rankscope.analysis import hessian as H
from rankscope.models import build_model, get_preset


def spd(n: int, eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


class Quadratic(nn.Module):
    """L(θ) = ½ θᵀ H θ + gᵀθ over two parameter tensors (a 2 × 3 matrix and a 2-vector)."""

    def __init__(self, hessian: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3, generator=torch.Generator().manual_seed(1)) * 1e-2)
        self.bias = nn.Parameter(torch.randn(2, generator=torch.Generator().manual_seed(2)) * 1e-2, requires_grad=False)
        self.register_buffer("hessian", hessian.float())
        self.register_buffer("gradient", torch.full((8,), 3e-3))

    def loss(self, _batch) -> torch.Tensor:
        theta = torch.cat([self.weight.reshape(-1), self.bias])
        return 0.5 * theta @ self.hessian @ theta + self.gradient @ theta


def quadratic_hvp(eigenvalues: list[float], seed: int = 0):
    hessian = spd(8, eigenvalues, seed)
    model = Quadratic(hessian)
    hvp, like = H.probe_hvp(model, ["weight", "bias"], [None, None], [0.25, 0.75], lambda m, b: m.loss(b))
    return model, hessian, hvp, like


def test_probe_hvp_of_a_quadratic_is_h_times_v_and_frozen_parameters_stay_frozen():
    model, hessian, hvp, like = quadratic_hvp([5e-2, 1e-2, 3e-3, 1e-3, 5e-4, 2e-4, 1e-4, 1e-5])
    v = [torch.randn(2, 3, generator=torch.Generator().manual_seed(3)), torch.randn(2, generator=torch.Generator().manual_seed(4))]
    hv = hvp(v)
    expected = hessian.float() @ torch.cat([v[0].reshape(-1), v[1]])
    assert torch.allclose(torch.cat([hv[0].reshape(-1), hv[1]]), expected, rtol=1e-5, atol=1e-9)  # batch weights sum to 1
    assert model.bias.requires_grad is False and model.weight.grad is None


def test_extreme_eigenvalues_of_a_quadratic_through_double_backward():
    eigenvalues = [4e-2, -1e-2, 3e-3, 1e-3, 5e-4, 2e-4, 1e-4, 1e-5]  # indefinite
    _, hessian, hvp, like = quadratic_hvp(eigenvalues, seed=5)
    result = H.extreme_eigenvalues(hvp, like, iterations=100, tolerance=1e-6)
    dense = torch.linalg.eigvalsh(hessian)
    assert result.largest.converged and result.smallest.converged
    assert result.largest.value == pytest.approx(float(dense[-1]), rel=1e-5)
    assert result.smallest.value == pytest.approx(float(dense[0]), rel=1e-5)
    # 8 parameters: the Krylov space is all of them after at most 8 HVPs, whatever the budget.
    assert result.largest.hvps <= 8 and result.smallest.hvps <= 8


class TinyNet(nn.Module):
    """A small nonconvex loss (a 2-layer tanh net fit away from its minimum, so its Hessian is
    indefinite) whose Hessian autograd can form densely."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.w1 = nn.Parameter(torch.randn(6, 4, generator=g, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(3, 6, generator=g, dtype=torch.float64))
        self.register_buffer("x", torch.randn(20, 4, generator=g, dtype=torch.float64))
        self.register_buffer("y", torch.randn(20, 3, generator=g, dtype=torch.float64))

    @staticmethod
    def loss_at(w1, w2, x, y):
        return ((torch.tanh(x @ w1.T) @ w2.T - y) ** 2).mean()

    def loss(self, _batch) -> torch.Tensor:
        return self.loss_at(self.w1, self.w2, self.x, self.y)

    def dense_hessian(self) -> torch.Tensor:
        def flat_loss(theta):
            return self.loss_at(theta[:24].reshape(6, 4), theta[24:].reshape(3, 6), self.x, self.y)
        theta = torch.cat([self.w1.detach().reshape(-1), self.w2.detach().reshape(-1)])
        return torch.autograd.functional.hessian(flat_loss, theta)


def test_extreme_eigenvalues_of_a_small_net_match_its_dense_hessian():
    model = TinyNet()
    hvp, like = H.probe_hvp(model, ["w1", "w2"], [None], [1.0], lambda m, b: m.loss(b))
    dense = torch.linalg.eigvalsh(model.dense_hessian())
    assert dense[0] < 0 < dense[-1]  # indefinite, so max and min are two different questions
    result = H.extreme_eigenvalues(hvp, like, iterations=42, tolerance=1e-6, seed=3)
    assert result.largest.converged and result.smallest.converged
    # The HVPs run in fp32 (probe_hvp accumulates in fp32): agreement to ~1e-5 of the spectrum's scale.
    scale = float(dense.abs().max())
    assert abs(result.largest.value - float(dense[-1])) < 1e-5 * scale
    assert abs(result.smallest.value - float(dense[0])) < 1e-5 * scale


def test_a_dominant_negative_eigenvalue_is_reported_as_the_minimum_not_the_top():
    # |λ_min| = 9 > λ_max = 5: power iteration's "top" eigenvalue was −9 here, read as sharpness.
    n = 300
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([-9.0, 5.0, 4.0], dtype=torch.float64),
                          torch.rand(n - 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 0.5])
    matrix = (q * spectrum) @ q.T
    like = [torch.zeros(10, 30)]

    def hvp(v):
        return [(matrix @ v[0].reshape(-1).double()).reshape(10, 30)]

    dense = torch.linalg.eigvalsh(matrix)
    result = H.extreme_eigenvalues(hvp, like, iterations=100, tolerance=1e-8)
    assert result.largest.converged and result.largest.value == pytest.approx(float(dense[-1]), rel=1e-9)  # 5
    assert result.smallest.converged and result.smallest.value == pytest.approx(float(dense[0]), rel=1e-9)  # −9
    assert result.largest.hvps < 100  # Lanczos needs far fewer than n = 300 products

    # ARPACK (scipy's eigsh, which='LA' / 'SA') on the same operator agrees: an independent oracle.
    from scipy.sparse.linalg import eigsh
    arpack = [float(eigsh(matrix.numpy(), k=1, which=w, return_eigenvectors=False)[0]) for w in ("LA", "SA")]
    assert arpack == pytest.approx([result.largest.value, result.smallest.value], rel=1e-9)

    # Seeded start: the same numbers twice; another seed converges to the same eigenvalues.
    assert H.extreme_eigenvalues(hvp, like, iterations=100, tolerance=1e-8) == result
    other = H.extreme_eigenvalues(hvp, like, iterations=100, tolerance=1e-8, seed=1)
    assert other.largest.value == pytest.approx(5.0, rel=1e-9) and other.smallest.value == pytest.approx(-9.0, rel=1e-9)


def test_a_budget_too_small_is_marked_not_converged_with_the_reason_and_keeps_a_bound():
    n = 300
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    spectrum = torch.linspace(-1.0, 2.0, n, dtype=torch.float64)  # no gap at either end: slow to converge
    matrix = (q * spectrum) @ q.T
    like = [torch.zeros(n)]
    calls = []

    def hvp(v):
        calls.append(1)
        return [matrix @ v[0].double()]

    result = H.extreme_eigenvalues(hvp, like, iterations=5, tolerance=1e-3)
    assert len(calls) == 5  # the budget is in HVPs, exactly
    for estimate in result:
        assert not estimate.converged and estimate.hvps == 5 and estimate.residual > 1e-3
        assert estimate.reason.startswith("Lanczos did not converge in 5 HVPs (relative residual ")
        assert "> tolerance 0.001" in estimate.reason and "hessian_iterations" in estimate.reason
    # Cauchy interlacing: the Ritz values lie inside the spectrum, so they are bounds.
    assert -1.0 < result.smallest.value < result.largest.value < 2.0
    with pytest.raises(AnalysisError):
        H.extreme_eigenvalues(hvp, like, iterations=0)


def test_a_zero_hessian_has_both_extremes_zero_after_one_product():
    result = H.extreme_eigenvalues(lambda v: [torch.zeros_like(t) for t in v], [torch.zeros(3, 4)], iterations=10)
    assert result.largest == result.smallest == H.Eigenvalue(0.0, 1, True, 0.0, "")


def test_hutchinson_trace_is_exact_for_a_diagonal_hessian_and_unbiased_otherwise():
    diagonal = torch.tensor([3e-2, 1e-2, 2e-3, 1e-3, 5e-4, 1e-4, 1e-5, 7e-3])
    like = [torch.zeros(8)]
    exact = H.hutchinson_trace(lambda v: [diagonal * v[0]], like, samples=3)
    assert exact.value == pytest.approx(float(diagonal.sum()), rel=1e-6) and exact.standard_error == pytest.approx(0.0, abs=1e-9)

    _, hessian, hvp, like = quadratic_hvp([5e-2, 1e-2, 3e-3, 1e-3, 5e-4, 2e-4, 1e-4, 1e-5], seed=7)
    estimate = H.hutchinson_trace(hvp, like, samples=400, seed=3)
    assert abs(estimate.value - float(torch.trace(hessian))) < 4 * estimate.standard_error
    with pytest.raises(AnalysisError):
        H.hutchinson_trace(hvp, like, samples=0)


def test_a_trace_is_readable_only_with_a_standard_error_within_the_threshold():
    assert H.trace_unreadable(H.Trace(200.0, 19.9, 10), 0.1) == ""
    assert H.trace_unreadable(H.Trace(-200.0, 20.0, 10), 0.1) == ""  # |value|: a negative trace is read too
    wide = H.trace_unreadable(H.Trace(200.0, 26.0, 2), 0.1)
    assert wide == ("Hutchinson standard error 26 is 13.0% of |trace| 200 after 2 samples (> 10% allowed) "
                    "— raise hessian_samples")
    assert "no standard error" in H.trace_unreadable(H.Trace(200.0, float("nan"), 1), 0.1)
    assert H.trace_unreadable(H.Trace(0.0, 1.0, 5), 0.1) != ""
    # A real estimate: the diagonal case is exact (SE 0), the dense one needs its samples.
    diagonal = torch.tensor([3e-2, 1e-2, 2e-3, 1e-3])
    assert H.trace_unreadable(H.hutchinson_trace(lambda v: [diagonal * v[0]], [torch.zeros(4)], samples=2), 0.1) == ""


@pytest.mark.parametrize("method", ["lora", "sltrain", "cola"])
def test_hvp_of_a_low_rank_model_matches_central_differences_of_its_gradient(method):
    # A real model (frozen LoRA base, SLTrain's custom autograd, CoLA's nonlinearity) against an
    # oracle that needs no double backward: (∇L(θ + εv) − ∇L(θ − εv)) / 2ε, in fp64.
    torch.manual_seed(0)
    config = dataclasses.replace(get_preset("tiny"), num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, vocab_size=64)
    model = build_model(config)
    cls = methods.get(method)
    settings = dataclasses.replace(cls.default_settings("tiny", config), rank=4)
    model = cls(settings, config, "tiny").parameterize(model).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.02 * torch.randn_like(p))  # away from init (LoRA's zero B)
    batch = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    names = [n for n, p in model.named_parameters() if p.is_floating_point()]

    def loss(m, b):  # token_losses' cross entropy is fp32; keep the rest of the oracle in fp64
        logits = m(b)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))

    hvp, like = H.probe_hvp(model, names, [batch], [1.0], loss)
    v = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i, t in enumerate(like)]
    hv = hvp(v)

    params = [dict(model.named_parameters())[n] for n in names]

    def gradient_at(sign: float) -> list[torch.Tensor]:
        # The model's RMSNorm and rotary tables work in fp32 even in an fp64 model, so the
        # difference quotient carries fp32 round-off: ε = 1e-4 balances it against truncation.
        eps = 1e-4
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(sign * eps * d)
        frozen = [p for p in params if not p.requires_grad]
        for p in frozen:
            p.requires_grad_(True)
        grads = torch.autograd.grad(loss(model, batch), params)
        for p in frozen:
            p.requires_grad_(False)
        with torch.no_grad():
            for p, d in zip(params, v):
                p.sub_(sign * eps * d)
        return [g / eps for g in grads]

    plus, minus = gradient_at(1.0), gradient_at(-1.0)
    oracle = torch.cat([((a - b) / 2).reshape(-1) for a, b in zip(plus, minus)])
    ours = torch.cat([t.reshape(-1).double() for t in hv])
    assert torch.linalg.vector_norm(ours - oracle) <= 5e-4 * torch.linalg.vector_norm(oracle)


@pytest.mark.parametrize("change, message", [
    ({"hessian_iterations": 0}, "hessian_iterations .* must be >= 1, got 0"),
    ({"hessian_tolerance": 0.0}, r"hessian_tolerance .* must be in \(0, 1\), got 0.0; 1e-2 is the default"),
    ({"hessian_tolerance": 1.0}, r"must be in \(0, 1\)"),
    ({"hessian_samples": 0}, r"hessian_samples must be >= 1 \(>= 2 to know the trace's standard error\)"),
    ({"hessian_trace_max_relative_se": 0.0}, r"hessian_trace_max_relative_se must be > 0 \(0.1: standard error <= 10 %"),
])
def test_hessian_settings_are_checked_with_one_line_naming_the_fix(change, message):
    from rankscope.analysis.settings import AnalysisSettings

    with pytest.raises(AnalysisError, match=message):
        AnalysisSettings(**change).validate()


def test_the_convergence_rules_key_the_hessian_items():
    # A stricter rule changes `converged`, so finished items must not be reused under another one.
    from rankscope.analysis.settings import AnalysisSettings

    default = AnalysisSettings()
    assert (default.hessian_iterations, default.hessian_tolerance, default.hessian_samples,
            default.hessian_trace_max_relative_se) == (100, 1e-2, 10, 0.1)
    keys = {str(AnalysisSettings(**change).family_settings("hessian"))
            for change in ({}, {"hessian_trace_max_relative_se": 0.05}, {"hessian_tolerance": 1e-3}, {"hessian_iterations": 50})}
    assert len(keys) == 4
