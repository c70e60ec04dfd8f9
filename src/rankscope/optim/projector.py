"""GaLore-style gradient projectors as plain functions over state tensors.

A projector for an m x n gradient G is one or two orthonormal matrices taken from the SVD of G:
- side "right": P_right = Vh[:r] (r x n), R = G P_rightᵀ (m x r), back(N) = N P_right
- side "left":  P_left = U[:, :r] (m x r), R = P_leftᵀ G (r x n), back(N) = P_left N
- side "full":  both, R = P_leftᵀ G P_rightᵀ (r x r), back(N) = P_left N P_right
They live in the optimizer state under "proj_left" / "proj_right" (tensors, never objects), so
checkpoints load with `weights_only=True`.

Every function takes one matrix (m x n) or a stack of k matrices of one shape (k x m x n), whose
projectors are stacked the same way; the optimizers step same-shaped matrices as one stack.

`proj_type` picks the side as galore_torch does: "std" projects onto the short side
(m >= n -> right, else left), "reverse_std" onto the long side, "left"/"right"/"full" literally.

The refresh takes the top-r singular vectors either from the exact SVD (`svd="exact"`, the
reference's `torch.linalg.svd`) or from a randomized one (`svd="randomized"`:
`torch.svd_lowrank`, Halko et al. 2009, with r + `oversample` columns and `niter` subspace
iterations). The randomized range finder draws its test matrix from a generator seeded with
`seed` inside `torch.random.fork_rng`, so the result is reproducible (and identical across
data-parallel ranks and across a resume) and the training's own random stream is untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_KINDS = ("exact", "randomized")


def projection_side(shape: torch.Size | tuple[int, ...], proj_type: str) -> str:
    """"left", "right" or "full" for a gradient of this shape."""
    rows, cols = shape[-2], shape[-1]
    if proj_type == "std":
        return "right" if rows >= cols else "left"
    if proj_type == "reverse_std":
        return "left" if rows >= cols else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"unknown proj_type {proj_type!r}: use one of {', '.join(PROJ_TYPES)}")


@contextlib.contextmanager
def _seeded_generator(device: torch.device, seed: int) -> Iterator[None]:
    """Seed only `device`'s default generator for the block, restoring every generator after."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.cuda.default_generators[index].manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield


def top_singular_vectors(
    matrix: torch.Tensor, rank: int, svd: str = "exact", oversample: int = 8, niter: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U[..., :, :rank], Vh[..., :rank, :]) of an fp32 matrix or stack, exact or randomized."""
    if svd == "exact":
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[..., :rank], vh[..., :rank, :]
    if svd != "randomized":
        raise ValueError(f"unknown svd {svd!r}: use one of {', '.join(SVD_KINDS)}")
    columns = min(rank + oversample, matrix.shape[-2], matrix.shape[-1])
    with _seeded_generator(matrix.device, seed):
        u, _, v = torch.svd_lowrank(matrix, q=columns, niter=niter)
    return u[..., :rank], v[..., :rank].mT


def compute_projection(
    grad: torch.Tensor, rank: int, side: str, svd: str = "exact", oversample: int = 8, niter: int = 2,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Top-`rank` singular vectors of `grad` (a matrix or a stack) for the side, in `grad`'s dtype.

    The SVD runs in fp32 (as galore_torch does for low-precision gradients). Only the needed
    singular vectors are kept, copied into compact tensors so the state never pins the full
    U / Vh factors.
    """
    matrix = grad if grad.dtype == torch.float32 else grad.float()
    u, vh = top_singular_vectors(matrix, rank, svd, oversample, niter, seed)
    out: dict[str, torch.Tensor] = {}
    # Always a copy: Vh[:rank] is a contiguous view that would keep (and save) all of Vh.
    if side in ("left", "full"):
        out["proj_left"] = u.to(grad.dtype, copy=True, memory_format=torch.contiguous_format)
    if side in ("right", "full"):
        out["proj_right"] = vh.to(grad.dtype, copy=True, memory_format=torch.contiguous_format)
    return out


def project(grad: torch.Tensor, projection: Mapping[str, torch.Tensor], side: str) -> torch.Tensor:
    """R = the gradient in the projected (low-rank) space."""
    if side == "right":
        return grad @ projection["proj_right"].mT
    if side == "left":
        return projection["proj_left"].mT @ grad
    return projection["proj_left"].mT @ grad @ projection["proj_right"].mT


def project_back(low: torch.Tensor, projection: Mapping[str, torch.Tensor], side: str) -> torch.Tensor:
    """back(N) as a new full-size tensor (or stack)."""
    if side == "right":
        return low @ projection["proj_right"]
    if side == "left":
        return projection["proj_left"] @ low
    return projection["proj_left"] @ low @ projection["proj_right"]


def add_projected_back(
    target: torch.Tensor, low: torch.Tensor, projection: Mapping[str, torch.Tensor], side: str, alpha: float
) -> None:
    """target += alpha * back(low), the accumulation fused into the GEMM (no full-size temporary).

    `target` is one matrix (addmm_) or a stack matching `low` (baddbmm_). A target in a narrower
    dtype than `low` (a bf16 weight stepped from fp32 state) cannot share the GEMM: the update is
    back-projected in `low`'s dtype and rounded into the target as it is added.
    """
    if target.dtype != low.dtype:
        target.add_(project_back(low, projection, side), alpha=alpha)
        return
    accumulate = target.addmm_ if target.dim() == 2 else target.baddbmm_
    if side == "right":
        accumulate(low, projection["proj_right"], alpha=alpha)
    elif side == "left":
        accumulate(projection["proj_left"], low, alpha=alpha)
    else:
        accumulate(projection["proj_left"] @ low, projection["proj_right"], alpha=alpha)


def reproject_moments(
    state: dict[str, Any], new_projection: Mapping[str, torch.Tensor], side: str, second: bool = True
) -> None:
    """Carry exp_avg (and, with `second`, exp_avg_sq) from the old subspace into the new one.

    The first moment is rotated exactly by the change of basis T (r x r): for the right side
    M <- M (P_old P_newᵀ), for the left side M <- (P_newᵀ P_old) M (GoLore's rotation). The
    second moment is not a linear quantity; it is carried with the elementwise square of T,
    which keeps it non-negative and equals the exact map when T is a signed permutation.
    """
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    if side in ("right", "full"):
        transfer = state["proj_right"] @ new_projection["proj_right"].mT
        exp_avg.copy_(exp_avg @ transfer)
        if second:
            exp_avg_sq.copy_(exp_avg_sq @ transfer.square())
    if side in ("left", "full"):
        transfer = new_projection["proj_left"].mT @ state["proj_left"]
        exp_avg.copy_(transfer @ exp_avg)
        if second:
            exp_avg_sq.copy_(transfer.square() @ exp_avg_sq)


def haar_projection(grad: torch.Tensor, rank: int, side: str, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random projector for one gradient: orthonormal rows (right) or columns (left).

    GoLore's random projector (pkumelon/Golore golore_projector.py `get_random_orthogonal_matrix`):
    Z ~ N(0, 1) in fp32 on the CPU, shaped r x n (right) or m x r (left), orthonormalised. The
    reference forms Z (ZᵀZ)^(-1/2), which for the r x n case inverts the square root of a rank-r
    n x n matrix and so leans on rounding noise; the polar factor U Vh of Z's thin SVD is the
    matrix that formula means (the same Haar-distributed draw, well-conditioned).
    """
    shape = (rank, grad.shape[-1]) if side == "right" else (grad.shape[-2], rank)
    if grad.device.type == "meta":  # shapes only (the memory table)
        return torch.empty(shape, device=grad.device, dtype=grad.dtype)
    draw = torch.randn(shape, generator=generator, dtype=torch.float32)
    u, _, vh = torch.linalg.svd(draw, full_matrices=False)
    return (u @ vh).to(device=grad.device, dtype=grad.dtype)


def projector_keys(side: str) -> tuple[str, ...]:
    """The state keys holding the projector(s) of this side."""
    return {"left": ("proj_left",), "right": ("proj_right",), "full": ("proj_left", "proj_right")}[side]
