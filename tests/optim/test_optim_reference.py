"""GaLoreAdamW and FiraAdamW against their reference packages (galore_torch 1.0, fira 1.0.2) as oracles.

Realistic inputs: weights at the LLaMA init scale (0.02), gradients of 1e-4 .. 1e-2 (a different
scale per tensor and step), production eps 1e-6 and lr 1e-2 on every group, and enough steps
to cross several projector refreshes. The comparison is on the updates W_T - W_0 (the weights
themselves would hide a wrong update behind their own magnitude).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from rankscope.optim import FiraAdamW, GaLoreAdamW
from rankscope.optim.projector import compute_projection

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import fira  # noqa: E402
    import galore_torch  # noqa: E402

# Two tall matrices of one shape, so that batched stepping really stacks several matrices.
PROJECTED_SHAPES = ((12, 8), (12, 8), (6, 10))
PLAIN_SHAPES = ((7,), (4, 5))
STEPS = 6           # projector refreshed at steps 0, 2, 4 with update_proj_gap=2
LR, EPS, WEIGHT_DECAY = 1e-2, 1e-6, 0.1
CASES = (
    [("galore", GaLoreAdamW, galore_torch.GaLoreAdamW, {"scale": 0.25}, pt)
     for pt in ("std", "reverse_std", "left", "right", "full")]
    + [("fira", FiraAdamW, fira.FiraAdamW, {"alpha": 0.25}, pt)
       for pt in ("std", "reverse_std", "left", "right")]
)


def _initial(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [(0.02 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)
            for shape in PROJECTED_SHAPES + PLAIN_SHAPES]


def _gradients(step: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Per tensor and step a scale between 1e-4 and 1e-2 (log-uniform), Gaussian entries."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for shape in PROJECTED_SHAPES + PLAIN_SHAPES:
        scale = 10.0 ** (-4.0 + 2.0 * torch.rand((), generator=g, dtype=torch.float64))
        out.append((scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype))
    return out


def run(optimizer_cls, extra_keys: dict, proj_type: str, dtype: torch.dtype = torch.float32,
        steps: int = STEPS, **kwargs) -> list[torch.Tensor]:
    """The updates W_T - W_0 of every tensor after `steps` steps."""
    initial = _initial(dtype)
    params = [torch.nn.Parameter(w.clone()) for w in initial]
    n_projected = len(PROJECTED_SHAPES)
    groups = [
        {"params": params[:n_projected], "rank": 3, "update_proj_gap": 2, "proj_type": proj_type, **extra_keys},
        {"params": params[n_projected:]},  # eps, lr, weight decay from the optimizer defaults
    ]
    optimizer = optimizer_cls(groups, lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS, **kwargs)
    for step in range(steps):
        for p, grad in zip(params, _gradients(step, dtype)):
            p.grad = grad
        optimizer.step()
    return [(p.detach() - w).double() for p, w in zip(params, initial)]


def relative_errors(mine: list[torch.Tensor], theirs: list[torch.Tensor]) -> list[float]:
    return [float((a - b).norm() / b.norm()) for a, b in zip(mine, theirs)]


LABELS = ["tall-a", "tall-b", "wide", "plain-vector", "plain-matrix"]


@pytest.mark.parametrize("batched", [False, True], ids=["per-matrix", "stacked"])
@pytest.mark.parametrize("name,ours,reference,extra,proj_type", CASES, ids=[f"{c[0]}-{c[4]}" for c in CASES])
def test_matches_reference_package_step_by_step(name, ours, reference, extra, proj_type, batched):
    for steps in (1, STEPS):  # the first step (largest eps effect) and across three refreshes
        mine = run(ours, extra, proj_type, steps=steps, batched=batched)
        theirs = run(reference, extra, proj_type, steps=steps, no_deprecation_warning=True)
        for label, error in zip(LABELS, relative_errors(mine, theirs)):
            assert error < 2e-5, f"{name} {proj_type} {label} after {steps} steps: relative error {error:.2e}"
    # The updates are of the size lr * steps would give: the comparison is not between zeros.
    assert all(float(u.abs().max()) > 0.1 * LR for u in mine)


@pytest.mark.parametrize("name,ours,reference,extra", [(c[0], c[1], c[2], c[3]) for c in CASES if c[4] == "std"],
                         ids=["galore", "fira"])
def test_matches_reference_package_in_float64(name, ours, reference, extra):
    """In fp64 the only differences are the order of floating-point operations: 1e-12, not 1e-5."""
    mine = run(ours, extra, "std", dtype=torch.float64)
    theirs = run(reference, extra, "std", dtype=torch.float64, no_deprecation_warning=True)
    for label, error in zip(LABELS, relative_errors(mine, theirs)):
        assert error < 1e-11, f"{name} {label}: relative error {error:.2e}"


def test_non_projected_parameters_are_not_torch_adamw():
    """The eps placement is visible at these magnitudes: torch's AdamW form is ~1e-2 away."""
    mine = run(GaLoreAdamW, {"scale": 0.25}, "std", steps=1)
    initial = _initial(torch.float32)[len(PROJECTED_SHAPES):]
    params = [torch.nn.Parameter(w.clone()) for w in initial]
    torch_adamw = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS)
    for p, grad in zip(params, _gradients(0, torch.float32)[len(PROJECTED_SHAPES):]):
        p.grad = grad
    torch_adamw.step()
    torch_updates = [(p.detach() - w).double() for p, w in zip(params, initial)]
    assert min(relative_errors(mine[len(PROJECTED_SHAPES):], torch_updates)) > 1e-3


def test_stacked_and_per_matrix_steps_agree():
    for cls, extra in ((GaLoreAdamW, {"scale": 0.25}), (FiraAdamW, {"alpha": 0.25})):
        single = run(cls, extra, "std", batched=False)
        stacked = run(cls, extra, "std", batched=True)
        assert max(relative_errors(stacked, single)) < 1e-6


# ----------------------------------------------------------------------------- randomized refresh
def _decaying_gradient(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A gradient with a power-law spectrum (s_i = i^-1.5), as LLM gradients concentrate their energy."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, min(rows, cols), generator=g))[0]
    v = torch.linalg.qr(torch.randn(cols, min(rows, cols), generator=g))[0]
    s = torch.arange(1, min(rows, cols) + 1, dtype=torch.float32) ** -1.5
    return 1e-3 * (u * s) @ v.T


def test_randomized_refresh_finds_the_exact_subspace_and_leaves_the_rng_alone():
    grad = _decaying_gradient(96, 64, seed=5)
    exact = compute_projection(grad, 8, "right")["proj_right"]
    before = torch.get_rng_state()
    randomized = compute_projection(grad, 8, "right", svd="randomized", oversample=8, niter=2, seed=3)["proj_right"]
    assert torch.equal(torch.get_rng_state(), before)  # the training's random stream is untouched
    again = compute_projection(grad, 8, "right", svd="randomized", oversample=8, niter=2, seed=3)["proj_right"]
    assert torch.equal(randomized, again)  # reproducible from the seed
    distance = torch.linalg.matrix_norm(exact.T @ exact - randomized.T @ randomized) / (2 * 8) ** 0.5
    assert float(distance) < 1e-3
    # With no subspace iteration the same sketch is visibly worse: the iterations are doing the work.
    rough = compute_projection(grad, 8, "right", svd="randomized", oversample=0, niter=0, seed=3)["proj_right"]
    assert float(torch.linalg.matrix_norm(exact.T @ exact - rough.T @ rough)) / (2 * 8) ** 0.5 > 10 * float(distance)


def test_randomized_refresh_keeping_every_column_is_the_exact_subspace():
    grad = _decaying_gradient(40, 12, seed=6)
    for side in ("left", "right"):
        exact = compute_projection(grad, 12, side)
        randomized = compute_projection(grad, 12, side, svd="randomized", oversample=4)
        for key, p in exact.items():
            q = randomized[key]
            gram = (p @ p.mT, q @ q.mT) if key == "proj_right" else (p.mT @ p, q.mT @ q)
            assert torch.allclose(*gram, atol=1e-5)


@pytest.mark.parametrize("cls,extra", [(GaLoreAdamW, {"scale": 0.25}), (FiraAdamW, {"alpha": 0.25})],
                         ids=["galore", "fira"])
def test_optimizer_with_randomized_refresh_keeps_the_exact_subspace(cls, extra):
    """At every refresh the stored projector spans the exact SVD's subspace (its basis may differ
    in sign, which, as GaLore keeps its moments across refreshes, changes later updates)."""
    weights = [torch.nn.Parameter(torch.zeros(48, 32)), torch.nn.Parameter(torch.zeros(32, 48))]
    optimizer = cls([{"params": weights, "rank": 4, "update_proj_gap": 3, "svd": "randomized", **extra}],
                    lr=1e-2, batched=True)
    for step in range(7):
        grads = [_decaying_gradient(48, 32, seed=step), _decaying_gradient(32, 48, seed=100 + step)]
        for w, g in zip(weights, grads):
            w.grad = g
        optimizer.step()
        if step % 3 == 0:
            for w, g, key in zip(weights, grads, ("proj_right", "proj_left")):
                exact = compute_projection(g, 4, key[5:])[key]
                stored = optimizer.state[w][key]
                gram = (exact.T @ exact, stored.T @ stored) if key == "proj_right" else (exact @ exact.T, stored @ stored.T)
                assert torch.allclose(*gram, atol=1e-4)
    assert all(float(w.detach().norm()) > 1e-2 for w in weights)


# ----------------------------------------------------------------------------- moment re-projection
def _subspace_gradients(steps: int, rows: int = 10, cols: int = 6, rank: int = 3):
    """Gradients that share one exact rank-3 row space, whose SVD basis is a re-ordered, sign-flipped
    version of the same rows at every step (distinct singular values in a new order each time)."""
    g = torch.Generator().manual_seed(3)
    row_basis = torch.linalg.qr(torch.randn(cols, rank, generator=g, dtype=torch.float64))[0].T
    grads = []
    for t in range(steps):
        left = torch.linalg.qr(torch.randn(rows, rank, generator=g, dtype=torch.float64))[0]
        order = torch.randperm(rank, generator=g)
        singular = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)[order] * (1 + 0.1 * t)
        grads.append(left @ torch.diag(singular) @ row_basis)
    return grads


def _run_galore(grads, reproject: bool, gap: int) -> torch.Tensor:
    weight = torch.nn.Parameter(torch.zeros(10, 6, dtype=torch.float64))
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 3, "update_proj_gap": gap,
                              "reproject_moments": reproject}], lr=0.01)
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
    return weight.detach().clone()


def test_reprojected_moments_make_the_basis_change_invisible():
    """When the subspace stays and only its basis is re-ordered/re-signed, re-projecting the moments
    gives the run whose projector never changed; the reference behaviour (no re-projection) does not."""
    grads = _subspace_gradients(6)
    never_refreshed = _run_galore(grads, reproject=False, gap=1000)
    reprojected = _run_galore(grads, reproject=True, gap=1)
    stale = _run_galore(grads, reproject=False, gap=1)
    assert torch.allclose(reprojected, never_refreshed, rtol=0, atol=1e-6)
    assert (stale - never_refreshed).abs().max() > 1e-4
