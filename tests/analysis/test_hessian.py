"""Known answers for the Hessian estimators: a quadratic with a known Hessian (through a real
double-backward HVP), Hutchinson's exactness on a diagonal Hessian, and HVPs of a real low-rank
model against central differences of its gradients."""

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


def test_top_eigenvalue_of_a_quadratic_by_power_iteration():
    eigenvalues = [4e-2, -1e-2, 3e-3, 1e-3, 5e-4, 2e-4, 1e-4, 1e-5]  # indefinite: the largest magnitude wins
    _, _, hvp, like = quadratic_hvp(eigenvalues, seed=5)
    result = H.top_eigenvalue(hvp, like, iterations=100, tolerance=1e-6)
    assert result.converged and result.iterations < 100
    assert result.value == pytest.approx(4e-2, rel=1e-5)
    short = H.top_eigenvalue(hvp, like, iterations=2, tolerance=1e-12)
    assert not short.converged and short.iterations == 2
    negative = H.top_eigenvalue(lambda v: [-2.0 * t for t in v], like, iterations=10)
    assert negative.value == pytest.approx(-2.0) and negative.converged


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
