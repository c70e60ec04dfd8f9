"""LORO: the exact Riemannian step against dense math, and the optimizer's step schedule."""

from __future__ import annotations

import math

import pytest
import torch

from rankscope.optim import LoroAdamW, exact_step


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
        # The official lazy step: X -= η_t·c·N, then X -= η_t·wd·X (bias-corrected step size).
        moved = old - _first_step_size(lr) * c * _first_adam_direction(grad)
        expected = moved * (1 - _first_step_size(lr) * wd)
        assert torch.allclose(new.detach(), expected, rtol=0, atol=1e-15)


def test_default_scale_is_rank_over_largest_dimension():
    B, A = _pair()
    assert LoroAdamW.approximate_scale({}, B, A) == 2 / 8
    assert LoroAdamW.approximate_scale({"lr_scale": 0.3}, B, A) == 0.3


@pytest.mark.parametrize("direction", ["adam", "grad"])
def test_exact_step_every_k_then_the_moments_restart(direction):
    K, lr = 3, 0.05
    B, A = _pair(1)
    optimizer = LoroAdamW([{"params": [B, A], "factor_pairs": True, "exact_every": K,
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
        assert int(state["step"]) == 0 and int(state["loro_step"]) == K
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()

    # Step K+1 starts from fresh moments at the group's lr (re-warming is the schedule's job).
    B_before = B.detach().clone()
    B.grad, A.grad = grads[K][0].clone(), grads[K][1].clone()
    optimizer.step()
    expected = B_before - _first_step_size(lr) * 0.5 * _first_adam_direction(grads[K][0])
    assert torch.allclose(B.detach(), expected, rtol=0, atol=1e-14)


def _factors_and_dense(seed: int = 3):
    """A factor pair and two dense tensors shaped like an embedding row block and a norm gain."""
    g = torch.Generator().manual_seed(seed)
    B, A = (torch.nn.Parameter(torch.randn(8, 2, generator=g, dtype=torch.float64) * 0.3),
            torch.nn.Parameter(torch.randn(2, 6, generator=g, dtype=torch.float64) * 0.3))
    embedding = torch.nn.Parameter(torch.randn(10, 6, generator=g, dtype=torch.float64) * 0.02)
    gain = torch.nn.Parameter(torch.ones(6, dtype=torch.float64))
    return [B, A], [embedding, gain]


def _grads(params, step):
    g = torch.Generator().manual_seed(50 + step)
    for i, p in enumerate(params):  # LLM-sized gradients: 1e-4 .. 1e-2
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 10.0 ** -(2 + i % 3)


@pytest.mark.parametrize("scope,refreshed", [("all", "factors+dense"), ("factors", "factors"), ("dense", "dense"),
                                             ("none", "")])
def test_refresh_zeroes_the_adam_state_of_the_named_tensors(scope, refreshed):
    """The official scripts pass --loro_refresh all: every tensor's moments and step restart, the
    embeddings, norms and head included, not only the factors'."""
    factors, dense = _factors_and_dense()
    optimizer = LoroAdamW([{"params": factors, "factor_pairs": True, "exact_every": 3, "refresh": scope,
                            "d_model": 6}, {"params": dense}], lr=0.01)
    for step in range(3):
        _grads(factors + dense, step)
        optimizer.step()
    for kind, params in (("factors", factors), ("dense", dense)):
        for p in params:
            state = optimizer.state[p]
            zeroed = int(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
            assert zeroed == (kind in refreshed.split("+")), (kind, scope)
    # The next step restarts Adam from the new gradient: bias correction from t = 1 again.
    _grads(factors + dense, 3)
    embedding_before = dense[0].detach().clone()
    optimizer.step()
    if "dense" in refreshed:
        expected = embedding_before - _first_step_size(0.01) * _first_adam_direction(dense[0].grad)
        assert torch.allclose(dense[0].detach(), expected, rtol=0, atol=1e-15)


def test_refresh_every_counts_separately_from_the_exact_steps():
    factors, dense = _factors_and_dense()
    optimizer = LoroAdamW([{"params": factors, "factor_pairs": True, "exact_every": 4, "refresh_every": 2,
                            "d_model": 6}, {"params": dense}], lr=0.01)
    steps_after = []
    for step in range(5):
        _grads(factors + dense, step)
        optimizer.step()
        steps_after.append(int(optimizer.state[dense[0]]["step"]))
    assert steps_after == [1, 0, 1, 0, 1]


def _official_regular_step(p, grad, state, lr, betas, eps, weight_decay):
    """LORO-main LOROAdamW._regular_step, transcribed: HF AdamW with eps outside the bias
    correction and the decay after the update, with the group lr."""
    beta1, beta2 = betas
    state["step"] += 1
    state["m"] = state["m"] * beta1 + (1 - beta1) * grad
    state["v"] = state["v"] * beta2 + (1 - beta2) * grad * grad
    step_size = lr * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
    p = p - step_size * state["m"] / (state["v"].sqrt() + eps)
    return p - lr * weight_decay * p


def test_dense_groups_step_as_loros_official_optimizer_with_realistic_gradients():
    """Embeddings, norms and head step exactly as the official optimizer's regular group, with
    production eps (1e-6) and LLM-sized gradients; torch AdamW, which adds eps after the bias
    correction, lands visibly elsewhere."""
    _, dense = _factors_and_dense(5)
    torch_twins = [torch.nn.Parameter(p.detach().clone()) for p in dense]
    reference = [p.detach().clone() for p in dense]
    states = [{"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)} for p in dense]
    kwargs = {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.1}
    optimizer = LoroAdamW([{"params": dense}], **kwargs)
    torch_adamw = torch.optim.AdamW(torch_twins, **kwargs)
    for step in range(5):
        _grads(dense, step)
        for i, (p, twin) in enumerate(zip(dense, torch_twins)):
            twin.grad = p.grad.clone()
            reference[i] = _official_regular_step(reference[i], p.grad, states[i], **kwargs)
        optimizer.step()
        torch_adamw.step()
    gaps = []
    for p, expected, twin in zip(dense, reference, torch_twins):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-13, atol=0)
        gaps.append(((twin.detach() - expected).norm() / (expected - p.detach().new_tensor(0)).norm()).item())
    assert max(gaps) > 1e-4  # the eps placement matters at these gradient sizes


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
