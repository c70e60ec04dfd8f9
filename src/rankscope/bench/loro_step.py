"""LORO's exact Riemannian step against the dense SVD retraction as the matrix grows (part of
`rankscope bench optimizer`).

For W = B·A (d x d, rank r fixed) the exact step `loro.exact_step` works on QR factors and a
2r x 2r SVD, O(r²·d); the dense formula SVD_r(W − η·P_T(G)) needs a full SVD, O(d³). Both are
timed for growing d and their log-log slopes fitted.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from rankscope.bench.common import median, run_alternating, timed

log = logging.getLogger("rankscope.bench")

CPU_LORO_SIZES = (64, 128, 256, 512, 1024)
CUDA_LORO_SIZES = (256, 512, 1024, 2048, 4096, 8192)


def dense_svd_retraction(B: torch.Tensor, A: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """SVD_r(W − lr·P_T(G)) with W = B·A, computed densely (the O(d³) reference formula)."""
    rank = B.shape[1]
    weight = B @ A
    u, _ = torch.linalg.qr(B)
    v, _ = torch.linalg.qr(A.mT)
    left = u @ (u.mT @ grad)
    tangent = left + (grad @ v) @ v.mT - (left @ v) @ v.mT
    uu, ss, vh = torch.linalg.svd(weight - lr * tangent, full_matrices=False)
    return (uu[:, :rank] * ss[:rank]) @ vh[:rank]


def loro_scaling(sizes: list[int], rank: int, device: torch.device, repeats: int, seed: int) -> list[dict[str, Any]]:
    from rankscope.optim import exact_step

    rows = []
    lr = 1e-2
    for d in sizes:
        r = min(rank, d // 2)
        generator = torch.Generator().manual_seed(seed + d)
        B = (torch.randn(d, r, generator=generator) / math.sqrt(d)).to(device)
        A = (torch.randn(r, d, generator=generator) / math.sqrt(d)).to(device)
        G = (torch.randn(d, d, generator=generator) / d).to(device)
        grad_B, grad_A = G @ A.mT, B.mT @ G

        calls = {"exact": lambda B=B, A=A, grad_B=grad_B, grad_A=grad_A: exact_step(B, A, grad_B, grad_A, lr),
                 "dense": lambda B=B, A=A, G=G: dense_svd_retraction(B, A, G, lr)}
        for fn in calls.values():
            fn()  # warm-up (allocations, kernels, lazy LAPACK init)
        samples = run_alternating(list(calls), repeats, lambda name, _, calls=calls: timed(calls[name], device)[0])
        new_B, new_A = exact_step(B, A, grad_B, grad_A, lr)
        dense = dense_svd_retraction(B, A, G, lr)
        agreement = float(torch.linalg.matrix_norm(new_B @ new_A - dense) / torch.linalg.matrix_norm(dense))
        exact_s, dense_s = median(samples["exact"]), median(samples["dense"])
        rows.append({"d": d, "rank": r, "exact_step_s": exact_s, "dense_svd_s": dense_s,
                     "dense_over_exact": dense_s / exact_s, "relative_difference": agreement})
        log.info("bench optimizer: LORO d=%d done", d)
    return rows


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log x (the empirical exponent of the scaling)."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(points) < 2:
        return None
    mean_x = sum(p[0] for p in points) / len(points)
    mean_y = sum(p[1] for p in points) / len(points)
    var = sum((p[0] - mean_x) ** 2 for p in points)
    return sum((p[0] - mean_x) * (p[1] - mean_y) for p in points) / var if var else None


def plot_scaling(path: Path, rows: list[dict[str, Any]], rank: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = [r["d"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.loglog(d, [r["exact_step_s"] for r in rows], "o-", label="LORO exact step (QR + 2r x 2r SVD)")
    ax.loglog(d, [r["dense_svd_s"] for r in rows], "s-", label="dense SVD retraction")
    ax.set_xlabel(f"d (weight d x d, rank r = {rank})")
    ax.set_ylabel("seconds per step (log scale)")
    ax.set_title("LORO exact step vs dense SVD retraction")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
