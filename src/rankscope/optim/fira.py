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

Group keys: rank, update_proj_gap (default 200), alpha (default 1.0, as fira's helper),
proj_type (std | reverse_std | left | right; fira's "full" cannot broadcast phi and is rejected).
The limiter is computed on the device (clamp), where the reference's python `max` on a tensor
forces a host sync per matrix; the values are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from rankscope.optim._base import (
    RankscopeOptimizer,
    bias_corrected_step_size,
    new_step_counter,
    update_adam_moments,
    validate_float,
)
from rankscope.optim.galore import validate_projected_group
from rankscope.optim.projector import add_projected_back, project, projection_side, refresh_projection_if_due

FIRA_PROJ_TYPES = ("std", "reverse_std", "left", "right")
NORM_GROWTH_LIMIT = 1.01
NORM_EPS = 1e-8


class FiraAdamW(RankscopeOptimizer):
    """AdamW with Fira's projected update plus scaled residual for groups that carry `rank`."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _validate_special_group(self, group: dict[str, Any]) -> bool:
        if "rank" not in group:
            return False
        group.setdefault("alpha", 1.0)
        validate_projected_group(group, "Fira", FIRA_PROJ_TYPES)
        validate_float(group, "alpha", 0.0)
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if "rank" in group:
                self._fira_group_step(group)
            else:
                self._plain_adamw_step(group)
        return loss

    def _fira_group_step(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        alpha = group["alpha"]
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            state = self.state[p]
            if "step" not in state:
                state["step"] = new_step_counter()
            step = int(state["step"])
            side = projection_side(grad.shape, group["proj_type"])
            refresh_projection_if_due(grad, state, group, side, step)
            low_grad = project(grad, state, side)
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(low_grad)
                state["exp_avg_sq"] = torch.zeros_like(low_grad)
            state["step"] += 1
            normalized = update_adam_moments(state, low_grad, beta1, beta2, group["eps"])
            step_size = bias_corrected_step_size(group["lr"], beta1, beta2, step + 1)

            # phi: norms along the projected axis, one factor per row (right) / column (left)
            # of the full matrix. Same axis as the reference wherever the reference runs.
            norm_dim = 1 if side == "right" else 0
            phi = torch.linalg.vector_norm(normalized, dim=norm_dim) / (
                torch.linalg.vector_norm(low_grad, dim=norm_dim) + NORM_EPS
            )
            if norm_dim == 1:
                phi = phi.unsqueeze(1)
            residual = grad.clone()
            add_projected_back(residual, low_grad, state, side, alpha=-alpha)
            residual.mul_(phi)

            residual_norm = torch.linalg.vector_norm(residual)
            if "prev_residual_norm" in state:
                ratio = residual_norm / (state["prev_residual_norm"] + NORM_EPS)
                limiter = torch.clamp(ratio, min=NORM_GROWTH_LIMIT) / NORM_GROWTH_LIMIT
                residual.div_(limiter)
                state["prev_residual_norm"].copy_(residual_norm / limiter)
            else:
                state["prev_residual_norm"] = residual_norm

            p.add_(residual, alpha=-step_size)
            add_projected_back(p, normalized, state, side, alpha=-step_size * alpha)
            if group["weight_decay"] > 0.0:
                p.add_(p, alpha=-group["lr"] * group["weight_decay"])
