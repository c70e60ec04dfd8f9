"""GaLoreAdamW and FiraAdamW against their reference packages (galore_torch, fira) as oracles."""

from __future__ import annotations

import warnings

import pytest
import torch

from rankscope.optim import FiraAdamW, GaLoreAdamW

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import fira  # noqa: E402
    import galore_torch  # noqa: E402

TALL, WIDE = (12, 8), (6, 10)
STEPS = 5           # projector refreshed at steps 0, 2, 4 with update_proj_gap=2
CASES = (
    [("galore", GaLoreAdamW, galore_torch.GaLoreAdamW, {"scale": 0.25}, pt)
     for pt in ("std", "reverse_std", "left", "right", "full")]
    + [("fira", FiraAdamW, fira.FiraAdamW, {"alpha": 0.25}, pt)
       for pt in ("std", "reverse_std", "left", "right")]
)


def run(optimizer_cls, extra_keys: dict, proj_type: str, reference: bool) -> list[torch.Tensor]:
    weights = torch.Generator().manual_seed(0)
    projected = [torch.nn.Parameter(torch.randn(*shape, generator=weights)) for shape in (TALL, WIDE)]
    plain = [torch.nn.Parameter(torch.randn(7, generator=weights)),
             torch.nn.Parameter(torch.randn(4, 5, generator=weights))]
    groups = [
        {"params": projected, "rank": 3, "update_proj_gap": 2, "proj_type": proj_type, **extra_keys},
        # The references put eps inside sqrt(v) + eps with bias correction in the step size,
        # torch (and so our plain groups) outside; with eps 1e-8 the two agree to ~1e-7.
        {"params": plain, "eps": 1e-8, "weight_decay": 0.0},
    ]
    kwargs = {"no_deprecation_warning": True} if reference else {}
    optimizer = optimizer_cls(groups, lr=0.01, weight_decay=0.1, eps=1e-6, **kwargs)
    grads = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for p in projected + plain:
            p.grad = torch.randn(p.shape, generator=grads)
        optimizer.step()
    return [p.detach().clone() for p in projected + plain]


@pytest.mark.parametrize("name,ours,reference,extra,proj_type", CASES,
                         ids=[f"{c[0]}-{c[4]}" for c in CASES])
def test_matches_reference_package(name, ours, reference, extra, proj_type):
    mine = run(ours, extra, proj_type, reference=False)
    theirs = run(reference, extra, proj_type, reference=True)
    labels = ["tall", "wide", "plain-vector", "plain-matrix"]
    for label, a, b in zip(labels, mine, theirs):
        relative = ((a - b).norm() / b.norm()).item()
        assert relative < 1e-5, f"{name} {proj_type} {label}: relative error {relative:.2e}"
    # The run must actually have moved the weights, or the comparison proves nothing.
    start = run(ours, extra, proj_type, reference=False)
    assert all(torch.equal(a, b) for a, b in zip(mine, start))  # deterministic
    initial = torch.randn(*TALL, generator=torch.Generator().manual_seed(0))
    assert (mine[0] - initial).norm() > 1e-3


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
