"""LORO: the exact Riemannian step against dense math, and the optimizer's step schedule."""

from __future__ import annotations

import math

import pytest
import torch

from rankscope.optim import LoroAdamW, exact_step
from rankscope.optim import loro as loro_module


def dense_riemannian_step(B, A, G, lr):
    """SVD_r(W - lr * P_T(G)) with P_T(G) = UUᵀG + GVVᵀ - UUᵀGVVᵀ at W = B A, all dense."""
    rank = B.shape[1]
    W = B @ A
    U, _, Vh = torch.linalg.svd(W)
    U, V = U[:, :rank], Vh[:rank].T
    PU, PV = U @ U.T, V @ V.T
    tangent = PU @ G + G @ PV - PU @ G @ PV
    U2, s2, Vh2 = torch.linalg.svd(W - lr * tangent)
    return (U2[:, :rank] * s2[:rank]) @ Vh2[:rank]


SHAPES = [(12, 12, 3), (12, 7, 3), (7, 15, 2), (20, 10, 5), (5, 9, 3), (9, 4, 1)]


@pytest.mark.parametrize("d_out,d_in,rank", SHAPES)
def test_exact_step_equals_dense_truncated_tangent_step(d_out, d_in, rank):
    g = torch.Generator().manual_seed(d_out * 100 + d_in)
    B = torch.randn(d_out, rank, generator=g, dtype=torch.float64)
    A = torch.randn(rank, d_in, generator=g, dtype=torch.float64)
    target = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    # Loss 1/2 ||B A - target||²: the dense gradient is known, G = B A - target.
    G = B @ A - target
    lr = 0.2
    B_new, A_new = exact_step(B, A, G @ A.T, B.T @ G, lr)

    expected = dense_riemannian_step(B, A, G, lr)
    assert (B_new @ A_new - expected).abs().max().item() < 1e-8
    assert torch.linalg.matrix_rank(B_new @ A_new).item() == rank
    gram_b, gram_a = B_new.T @ B_new, A_new @ A_new.T
    assert torch.allclose(gram_b, gram_a, atol=1e-9, rtol=0)          # balanced factors
    assert torch.allclose(gram_b, torch.diag(torch.diag(gram_b)), atol=1e-9, rtol=0)
    assert (B_new @ A_new - B @ A).abs().max() > 1e-2                 # the step moved W


def test_exact_step_keeps_dtype_and_computes_in_fp32():
    g = torch.Generator().manual_seed(5)
    B = torch.randn(10, 2, generator=g).to(torch.bfloat16)
    A = torch.randn(2, 8, generator=g).to(torch.bfloat16)
    G = torch.randn(10, 8, generator=g)
    B_new, A_new = exact_step(B, A, (G @ A.float().T).bfloat16(), (B.float().T @ G).bfloat16(), 0.1)
    assert B_new.dtype == A_new.dtype == torch.bfloat16
    expected = dense_riemannian_step(B.double(), A.double(), G.double(), 0.1)
    relative = (B_new.double() @ A_new.double() - expected).norm() / expected.norm()
    assert relative < 2e-2


def test_exact_step_is_importable_from_module():
    assert loro_module.exact_step is exact_step


# ------------------------------------------------------------------------- the optimizer
BETA1, BETA2, EPS = 0.9, 0.999, 1e-6


def _pair(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B = torch.nn.Parameter(torch.randn(8, 2, generator=g, dtype=torch.float64))
    A = torch.nn.Parameter(torch.randn(2, 6, generator=g, dtype=torch.float64))
    return B, A


def _first_adam_direction(grad):
    """m / (sqrt(v) + eps) after one step from zero moments."""
    return (1 - BETA1) * grad / ((1 - BETA2) ** 0.5 * grad.abs() + EPS)


def _first_step_size(lr):
    return lr * math.sqrt(1 - BETA2) / (1 - BETA1)


def test_approximate_step_is_adam_scaled_by_rank_over_d_model():
    B, A = _pair()
    B0, A0 = B.detach().clone(), A.detach().clone()
    lr, d_model, wd = 0.01, 16, 0.1
    optimizer = LoroAdamW([{"params": [B, A], "factor_pairs": True, "exact_every": 100, "d_model": d_model}],
                          lr=lr, betas=(BETA1, BETA2), eps=EPS, weight_decay=wd)
    gB, gA = torch.randn_like(B), torch.randn_like(A)
    B.grad, A.grad = gB.clone(), gA.clone()
    optimizer.step()
    c = 2 / d_model
    for new, old, grad in ((B, B0, gB), (A, A0, gA)):
        expected = old * (1 - lr * wd) - _first_step_size(lr) * c * _first_adam_direction(grad)
        assert torch.allclose(new.detach(), expected, rtol=0, atol=1e-15)


def test_default_scale_is_rank_over_largest_dimension():
    B, A = _pair()
    assert LoroAdamW.approximate_scale({}, B, A) == 2 / 8
    assert LoroAdamW.approximate_scale({"lr_scale": 0.3}, B, A) == 0.3


@pytest.mark.parametrize("direction", ["adam", "grad"])
def test_exact_step_every_k_then_state_reset_and_rewarm(direction):
    K, rewarm, lr = 3, 2, 0.05
    B, A = _pair(1)
    optimizer = LoroAdamW([{"params": [B, A], "factor_pairs": True, "exact_every": K, "rewarm_steps": rewarm,
                            "lr_scale": 0.5, "exact_direction": direction}],
                          lr=lr, betas=(BETA1, BETA2), eps=EPS)
    g = torch.Generator().manual_seed(2)
    grads = [(torch.randn(8, 2, generator=g, dtype=torch.float64),
              torch.randn(2, 6, generator=g, dtype=torch.float64)) for _ in range(5)]
    for t in range(K - 1):
        B.grad, A.grad = grads[t][0].clone(), grads[t][1].clone()
        optimizer.step()

    # Step K: exact step with the Adam directions (moments advanced by this gradient) or raw grads.
    B_before, A_before = B.detach().clone(), A.detach().clone()
    gB, gA = grads[K - 1]
    if direction == "adam":
        directions, step_lr = [], lr * math.sqrt(1 - BETA2**K) / (1 - BETA1**K)
        for p, grad in ((B, gB), (A, gA)):
            state = optimizer.state[p]
            m = BETA1 * state["exp_avg"] + (1 - BETA1) * grad
            v = BETA2 * state["exp_avg_sq"] + (1 - BETA2) * grad * grad
            directions.append(m / (v.sqrt() + EPS))
    else:
        directions, step_lr = [gB, gA], lr
    expected_B, expected_A = exact_step(B_before, A_before, directions[0], directions[1], step_lr)
    B.grad, A.grad = gB.clone(), gA.clone()
    optimizer.step()
    assert torch.allclose(B.detach(), expected_B, rtol=0, atol=1e-12)
    assert torch.allclose(A.detach(), expected_A, rtol=0, atol=1e-12)
    for p in (B, A):
        state = optimizer.state[p]
        assert int(state["step"]) == 0
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()

    # Steps K+1, K+2: fresh moments, lr re-warmed to 1/2 then 2/2 of the scheduler's lr.
    for t, multiplier in ((K, 0.5), (K + 1, 1.0)):
        B_before = B.detach().clone()
        B.grad, A.grad = grads[t][0].clone(), grads[t][1].clone()
        optimizer.step()
        if multiplier == 0.5:
            expected = B_before - _first_step_size(lr * multiplier) * 0.5 * _first_adam_direction(grads[t][0])
            assert torch.allclose(B.detach(), expected, rtol=0, atol=1e-14)
    assert int(optimizer.state[B]["rewarm_count"]) == rewarm


def test_loro_fits_a_low_rank_target_and_stays_balanced_after_exact_steps():
    g = torch.Generator().manual_seed(7)
    target = torch.randn(16, 3, generator=g) @ torch.randn(3, 12, generator=g)
    B = torch.nn.Parameter(torch.randn(16, 3, generator=g) * 0.3)
    A = torch.nn.Parameter(torch.randn(3, 12, generator=g) * 0.3)
    optimizer = LoroAdamW([{"params": [B, A], "factor_pairs": True, "exact_every": 10, "d_model": 12}], lr=0.05)

    def loss() -> torch.Tensor:
        return 0.5 * (B @ A - target).square().sum()

    start = loss().item()
    for _ in range(150):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.05 * start
    # Step 150 was an exact step (150 % 10 == 0): its retraction leaves the factors balanced.
    with torch.no_grad():
        assert torch.allclose(B.T @ B, A @ A.T, rtol=1e-4, atol=1e-4)
