"""GaLore-style gradient projectors as plain functions over state tensors.

A projector for an m x n gradient G is one or two orthonormal matrices taken from the SVD of G:
- side "right": P_right = Vh[:r] (r x n), R = G P_rightᵀ (m x r), back(N) = N P_right
- side "left":  P_left = U[:, :r] (m x r), R = P_leftᵀ G (r x n), back(N) = P_left N
- side "full":  both, R = P_leftᵀ G P_rightᵀ (r x r), back(N) = P_left N P_right
They live in the optimizer state under "proj_left" / "proj_right" (tensors, never objects), so
checkpoints load with `weights_only=True`.

`proj_type` picks the side as galore_torch does: "std" projects onto the short side
(m >= n -> right, else left), "reverse_std" onto the long side, "left"/"right"/"full" literally.
"""

from __future__ import annotations

from typing import Any

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


def projection_side(shape: torch.Size | tuple[int, ...], proj_type: str) -> str:
    """"left", "right" or "full" for a gradient of this shape."""
    rows, cols = shape[0], shape[1]
    if proj_type == "std":
        return "right" if rows >= cols else "left"
    if proj_type == "reverse_std":
        return "left" if rows >= cols else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"unknown proj_type {proj_type!r}: use one of {', '.join(PROJ_TYPES)}")


def compute_projection(grad: torch.Tensor, rank: int, side: str) -> dict[str, torch.Tensor]:
    """Top-`rank` singular vectors of `grad` for the requested side, in `grad`'s dtype.

    The SVD runs in fp32 (as galore_torch does for low-precision gradients). Only the needed
    singular vectors are kept, copied into compact tensors so the state never pins the full
    U / Vh factors.
    """
    matrix = grad if grad.dtype == torch.float32 else grad.float()
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    out: dict[str, torch.Tensor] = {}
    if side in ("left", "full"):
        out["proj_left"] = u[:, :rank].to(grad.dtype).contiguous()
    if side in ("right", "full"):
        out["proj_right"] = vh[:rank].to(grad.dtype).contiguous()
    return out


def project(grad: torch.Tensor, state: dict[str, Any], side: str) -> torch.Tensor:
    """R = the gradient in the projected (low-rank) space."""
    if side == "right":
        return grad @ state["proj_right"].mT
    if side == "left":
        return state["proj_left"].mT @ grad
    return state["proj_left"].mT @ grad @ state["proj_right"].mT


def project_back(low: torch.Tensor, state: dict[str, Any], side: str) -> torch.Tensor:
    """back(N) as a new full-size tensor."""
    if side == "right":
        return low @ state["proj_right"]
    if side == "left":
        return state["proj_left"] @ low
    return state["proj_left"] @ low @ state["proj_right"]


def add_projected_back(
    target: torch.Tensor, low: torch.Tensor, state: dict[str, Any], side: str, alpha: float
) -> None:
    """target += alpha * back(low), fused into one GEMM with accumulation (no full-size temporary)."""
    if side == "right":
        target.addmm_(low, state["proj_right"], alpha=alpha)
    elif side == "left":
        target.addmm_(state["proj_left"], low, alpha=alpha)
    else:
        target.addmm_(state["proj_left"] @ low, state["proj_right"], alpha=alpha)


def reproject_moments(
    state: dict[str, Any], new_projection: dict[str, torch.Tensor], side: str
) -> None:
    """Carry exp_avg / exp_avg_sq from the old subspace into the new one (optional, not GaLore's default).

    The first moment is rotated exactly by the change of basis T (r x r): for the right side
    M <- M (P_old P_newᵀ), for the left side M <- (P_newᵀ P_old) M. The second moment is not a
    linear quantity; it is carried with the elementwise square of T, which keeps it
    non-negative and equals the exact map when T is a signed permutation.
    """
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    if side in ("right", "full"):
        transfer = state["proj_right"] @ new_projection["proj_right"].mT
        exp_avg.copy_(exp_avg @ transfer)
        exp_avg_sq.copy_(exp_avg_sq @ transfer.square())
    if side in ("left", "full"):
        transfer = new_projection["proj_left"].mT @ state["proj_left"]
        exp_avg.copy_(transfer @ exp_avg)
        exp_avg_sq.copy_(transfer.square() @ exp_avg_sq)


def refresh_projection_if_due(
    grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any], side: str, step: int
) -> None:
    """Recompute the projector at steps 0, T, 2T, ... (step counted before this update), as galore_torch."""
    missing = ("proj_left" if side in ("left", "full") else "proj_right") not in state
    if not missing and step % group["update_proj_gap"] != 0:
        return
    new_projection = compute_projection(grad, group["rank"], side)
    if group.get("reproject_moments", False) and not missing and "exp_avg" in state:
        reproject_moments(state, new_projection, side)
    state.update(new_projection)
