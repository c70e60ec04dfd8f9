"""GaLoreAdamW: Adam in a low-rank gradient subspace, same numbers as galore_torch.GaLoreAdamW.

For a group with the key `rank`, every 2-D parameter's gradient G is projected, R = proj(G)
(see `projector.py`); Adam moments live in that projected space; the normalized update
N = m / (sqrt(v) + eps) is projected back and scaled:

    W <- W - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * scale * back(N)
    W <- W - lr * weight_decay * W            (decoupled, after the update, as the reference)

The projector is recomputed from the current gradient's SVD at steps 0, T, 2T, ...
(T = update_proj_gap). Like the reference, the moments are neither reset nor re-projected when
the projector changes; `reproject_moments=True` carries them into the new basis instead.

Group keys: rank (int >= 1), update_proj_gap (int >= 1, default 200), scale (float > 0,
default 1.0), proj_type (std | reverse_std | left | right | full, default std),
reproject_moments (bool, default False). Groups without `rank` are torch.optim.AdamW.

Numerics vs the reference: identical operations except that back-projection and the final
update are fused into one `addmm_` (and scale folded into the step size), which avoids a
full-size temporary; results agree to float rounding (~1e-7 relative).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from rankscope.optim._base import (
    RankscopeOptimizer,
    bias_corrected_step_size,
    new_step_counter,
    require,
    update_adam_moments,
    validate_float,
    validate_int,
)
from rankscope.optim.projector import (
    PROJ_TYPES,
    add_projected_back,
    project,
    projection_side,
    refresh_projection_if_due,
)


def validate_projected_group(group: dict[str, Any], method: str, proj_types: tuple[str, ...]) -> None:
    """Fill defaults and check the keys shared by GaLore and Fira groups."""
    group.setdefault("update_proj_gap", 200)
    group.setdefault("proj_type", "std")
    group.setdefault("reproject_moments", False)
    validate_int(group, "rank", 1)
    validate_int(group, "update_proj_gap", 1)
    require(group["proj_type"] in proj_types,
            f"invalid proj_type {group['proj_type']!r} for {method}: use one of {', '.join(proj_types)}")
    require(isinstance(group["reproject_moments"], bool),
            f"invalid reproject_moments {group['reproject_moments']!r}: use true or false")
    for p in group["params"]:
        require(p.dim() == 2,
                f"{method} projects 2-D weights only, got a parameter of shape {tuple(p.shape)}: "
                "put it in a group without 'rank'")


class GaLoreAdamW(RankscopeOptimizer):
    """AdamW with GaLore gradient projection for groups that carry `rank`."""

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
        group.setdefault("scale", 1.0)
        validate_projected_group(group, "GaLore", PROJ_TYPES)
        validate_float(group, "scale", 0.0, strict=True)
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if "rank" in group:
                self._galore_group_step(group)
            else:
                self._plain_adamw_step(group)
        return loss

    def _galore_group_step(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            state = self.state[p]
            if "step" not in state:
                state["step"] = new_step_counter()
            step = int(state["step"])  # CPU counter: no device sync
            side = projection_side(grad.shape, group["proj_type"])
            refresh_projection_if_due(grad, state, group, side, step)
            low_grad = project(grad, state, side)
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(low_grad)
                state["exp_avg_sq"] = torch.zeros_like(low_grad)
            state["step"] += 1
            normalized = update_adam_moments(state, low_grad, beta1, beta2, group["eps"])
            step_size = bias_corrected_step_size(group["lr"], beta1, beta2, step + 1)
            add_projected_back(p, normalized, state, side, alpha=-step_size * group["scale"])
            if group["weight_decay"] > 0.0:
                p.add_(p, alpha=-group["lr"] * group["weight_decay"])
