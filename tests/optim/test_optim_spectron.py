"""Spectron: orthogonalized factor updates whose product update is bounded in spectral norm."""

from __future__ import annotations

import pytest
import torch

from rankscope.optim import Spectron, SpectronAdamW
from rankscope.optim.spectron import newton_schulz5, power_iteration_step


def spectral_norm(x: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(x.double(), ord=2).item()


@pytest.mark.parametrize("shape", [(64, 8), (8, 48), (30, 30)])
def test_newton_schulz_keeps_singular_vectors_and_lands_near_one(shape):
    g = torch.Generator().manual_seed(sum(shape))
    M = torch.randn(*shape, generator=g) * 5.0
    O = newton_schulz5(M)
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    rotated = U.T @ O @ Vh.T                # diagonal iff O shares M's singular vectors
    assert (rotated - torch.diag(torch.diag(rotated))).abs().max() < 1e-4
    singular = torch.linalg.svdvals(O)
    # Muon's quintic does not converge to exactly 1: it lands in a band around it.
    assert singular.min() > 0.6 and singular.max() < 1.2
    assert O.dtype == torch.float32


def test_power_iteration_is_a_lower_bound_that_converges():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 6, generator=g)
    truth = spectral_norm(X)
    vector = torch.ones(6) / 6**0.5
    estimates = [power_iteration_step(X, vector).item() for _ in range(40)]
    assert all(e <= truth * (1 + 1e-6) for e in estimates)
    assert abs(estimates[-1] - truth) / truth < 1e-4
    # Wide matrices iterate on their short side too.
    wide = X.T.contiguous()
    short_vector = torch.ones(6) / 6**0.5
    for _ in range(40):
        estimate = power_iteration_step(wide, short_vector).item()
    assert abs(estimate - truth) / truth < 1e-4


@pytest.mark.parametrize("d_out,rank,d_in,size", [(24, 4, 16, 0.2), (12, 3, 30, 1.0), (20, 5, 20, 20.0)])
def test_realised_update_obeys_the_spectral_bound(d_out, rank, d_in, size):
    # float64 factors so the realised update can be read back exactly (the iterations still run in fp32).
    g = torch.Generator().manual_seed(d_out + d_in)
    B = torch.nn.Parameter(torch.randn(d_out, rank, generator=g, dtype=torch.float64) * size / d_out**0.5)
    A = torch.nn.Parameter(torch.randn(rank, d_in, generator=g, dtype=torch.float64) * size / d_in**0.5)
    grad_B = torch.randn(d_out, rank, generator=g, dtype=torch.float64)
    grad_A = torch.randn(rank, d_in, generator=g, dtype=torch.float64)
    optimizer = Spectron([{"params": [B, A], "factor_pairs": True}], lr=0.0)
    # Warm the power-iteration vectors (lr 0 leaves the factors where they are).
    for _ in range(12):
        B.grad, A.grad = grad_B.clone(), grad_A.clone()
        optimizer.step()

    lr = 0.05
    optimizer.param_groups[0]["lr"] = lr
    B_before, A_before = B.detach().clone(), A.detach().clone()
    B.grad, A.grad = grad_B.clone(), grad_A.clone()
    optimizer.step()

    O_B = newton_schulz5(optimizer.state[B]["momentum_buffer"]).double()
    O_A = newton_schulz5(optimizer.state[A]["momentum_buffer"]).double()
    # The step is X <- X - rho O_X with one rho for both factors: recover it from each factor.
    rho_B = ((B_before - B.detach()).norm() / O_B.norm()).item()
    rho_A = ((A_before - A.detach()).norm() / O_A.norm()).item()
    assert abs(rho_A - rho_B) <= 1e-6 * rho_A   # rho and O_X * rho are fp32
    assert torch.allclose(A.detach(), A_before - rho_A * O_A, rtol=0, atol=1e-8)
    sigma_A, sigma_B = spectral_norm(A_before), spectral_norm(B_before)
    rho_exact = lr / (sigma_A + sigma_B + 1.0)
    # Warm estimates are accurate; they can only err low (so rho only errs high).
    assert rho_A >= rho_exact * (1 - 1e-5) and rho_A <= rho_exact * (1 + 1e-3)

    delta = B.detach() @ A.detach() - B_before @ A_before
    o_max = max(1.0, spectral_norm(O_A), spectral_norm(O_B))
    second_order = rho_A**2 * spectral_norm(O_B) * spectral_norm(O_A)
    assert spectral_norm(delta) <= lr * o_max * (1 + 1e-3) + second_order
    assert o_max < 1.2                     # so ||ΔW||₂ <= 1.2 lr + O(rho²) in the worst case
    assert spectral_norm(delta) > 0.1 * lr * sigma_A / (sigma_A + sigma_B + 1)   # it did move


def test_weight_decay_is_decoupled_and_applied_first():
    g = torch.Generator().manual_seed(3)
    B = torch.nn.Parameter(torch.randn(6, 2, generator=g))
    A = torch.nn.Parameter(torch.randn(2, 5, generator=g))
    optimizer = SpectronAdamW([{"params": [B, A], "factor_pairs": True, "momentum": 0.0}], lr=0.1,
                              weight_decay=0.5)
    B0, A0 = B.detach().clone(), A.detach().clone()
    B.grad, A.grad = torch.zeros_like(B), torch.zeros_like(A)   # no gradient: only the decay acts
    optimizer.step()
    assert torch.allclose(B.detach(), B0 * (1 - 0.05)) and torch.allclose(A.detach(), A0 * (1 - 0.05))


def test_spectron_fits_a_low_rank_target():
    g = torch.Generator().manual_seed(4)
    target = torch.randn(16, 3, generator=g) @ torch.randn(3, 12, generator=g)
    B = torch.nn.Parameter(torch.randn(16, 3, generator=g) * 0.3)
    A = torch.nn.Parameter(torch.randn(3, 12, generator=g) * 0.3)
    optimizer = Spectron([{"params": [B, A], "factor_pairs": True}], lr=0.5)

    def loss() -> torch.Tensor:
        return 0.5 * (B @ A - target).square().sum()

    start = loss().item()
    for _ in range(150):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.1 * start
