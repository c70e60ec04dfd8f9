"""FiraAdamW: GaLore plus a norm-scaled full-rank residual, same numbers as fira.FiraAdamW.

For a group with `rank`, with R = proj(G) and N = m / (sqrt(v) + eps) the Adam output in the
projected space:

    phi = ||N|| / (||R|| + 1e-8)   per row (right side) or per column (left side) of the
                                   projected matrix, i.e. along the long dimension
    S   = (G - alpha * back(R)) * phi
    norm-growth limiter: if ||S|| / ||S_prev|| > 1.01, S <- S * 1.01 / ratio; store ||S||
    W  <- W - lr_t * (alpha * back(N) + S),   lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)
    W  <- W - lr * weight_decay * W           (decoupled, after the update)

Note the reference multiplies the projected-back gradient by alpha inside the residual, so S
keeps (1 - alpha) of the in-subspace part of G; this is reproduced on purpose.

Group keys: those of GaLoreAdamW except `scale`, plus alpha (default 1.0, as fira's helper);
proj_type std | reverse_std | left | right (fira's "full" cannot broadcast phi and is rejected).
Groups without `rank` are stepped as fira steps them (the Hugging Face AdamW form, `_base.py`).

Computation (stacks of same-shaped matrices, as in `galore.py`): phi scales whole rows (right
side) or columns (left side) of the full matrix, and such a scaling commutes with the
back-projection, so S = G * phi - alpha * back(R * phi) is formed with one GEMM accumulating into
G * phi, never materialising back(R). The limiter is computed on the device (clamp), where the
reference's python `max` on a tensor forces a host sync per matrix; the values are the same.
"""

from __future__ import annotations

from typing import Any

import torch

from rankscope.optim._base import require, validate_float
from rankscope.optim.galore import MatrixStack, ProjectedAdamW
from rankscope.optim.projector import add_projected_back, projection_side

FIRA_PROJ_TYPES = ("std", "reverse_std", "left", "right")
NORM_GROWTH_LIMIT = 1.01
NORM_EPS = 1e-8


class FiraAdamW(ProjectedAdamW):
    """AdamW with Fira's projected update plus scaled residual for groups that carry `rank`."""

    method_name = "Fira"
    proj_types = FIRA_PROJ_TYPES

    def _validate_special_group(self, group: dict[str, Any]) -> bool:
        if "rank" not in group:
            return False
        group.setdefault("alpha", 1.0)
        super()._validate_special_group(group)
        validate_float(group, "alpha", 0.0)
        for p in group["params"]:
            rows, cols = p.shape
            # The reference takes phi's axis from the projected matrix's shape; a left projection
            # keeping every column (rank >= cols <= rows) flips it onto the rank axis, where phi no
            # longer broadcasts against the gradient (fira fails with a shape error there, or, on a
            # square weight, scales its rows by norms taken over columns). Nothing is low-rank there.
            require(projection_side(p.shape, group["proj_type"]) != "left" or min(group["rank"], rows) < cols,
                    f"Fira cannot project a {rows} x {cols} weight on the left with rank {group['rank']} >= its "
                    f"{cols} columns: lower the rank below {cols} or use proj_type std")
        return True

    def _apply_update(self, group: dict[str, Any], stack: MatrixStack, low: torch.Tensor,
                      directions: torch.Tensor, step_size: float) -> None:
        alpha = group["alpha"]
        projection = stack.projection()
        # phi along the projected matrix's long axis, as the reference picks it from the shape (the
        # whole matrix's shape: under FSDP a right-side R holds only this rank's rows).
        rows = stack.params[0].shape[0] if stack.side == "right" else low.shape[-2]
        axis = -2 if rows < low.shape[-1] else -1
        phi = torch.linalg.vector_norm(directions, dim=axis, keepdim=True) / (
            torch.linalg.vector_norm(low, dim=axis, keepdim=True) + NORM_EPS
        )
        residual = stack.grads() * phi
        add_projected_back(residual, low * phi, projection, stack.side, alpha=-alpha)

        if stack.sharded:  # the norm of the whole residual, from every rank's rows
            norms = stack.sum_over_ranks(residual.square().sum(dim=(-2, -1))).sqrt()
        else:
            norms = torch.linalg.vector_norm(residual, dim=(-2, -1))
        previous = [s.get("prev_residual_norm") for s in stack.states]
        if all(norm is not None for norm in previous):  # set together, at a matrix's first step
            limiter = torch.clamp(norms / (stack.stack(previous) + NORM_EPS), min=NORM_GROWTH_LIMIT) / NORM_GROWTH_LIMIT
            torch._foreach_copy_(previous, stack.unstack(norms / limiter))
        else:
            limiter = torch.ones_like(norms)
            for state, norm in zip(stack.states, stack.unstack(norms)):
                state["prev_residual_norm"] = norm.clone()

        if stack.single:
            param = stack.local_params()[0]
            param.addcdiv_(residual, limiter, value=-step_size)
            add_projected_back(param, directions, projection, stack.side, alpha=-step_size * alpha)
        else:
            residual.div_(limiter.view(-1, 1, 1))
            add_projected_back(residual, directions, projection, stack.side, alpha=alpha)
            torch._foreach_add_(stack.local_params(), stack.unstack(residual), alpha=-step_size)
