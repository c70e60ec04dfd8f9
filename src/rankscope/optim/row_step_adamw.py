"""RowStepAdamW: torch's AdamW with a step count per row (or column) of a matrix.

SwitchLoRA (asfsdsf/SwitchLoRA @f9a174e, switchlora/optimizer.py `StepAdamW` and
`_multi_tensor_adamw_element_wise_step`) restarts Adam's bias correction for each LoRA vector it
resets: A's state "step" is an (r x 1) tensor, one count per row, B's a (1 x r) tensor, one per
column. A group with `step_axis` 0 (rows, A) or 1 (columns, B) is stepped as torch's AdamW
(multi-tensor form) with the bias corrections taken per row / column:

    W <- W·(1 − lr·wd);  m <- lerp(m, g, 1 − β1);  v <- β2·v + (1 − β2)·g²
    W <- W + m / ((√v / √(1 − β2^t) + eps) / (−lr / (1 − β1^t)))      t: the row's / column's count

Groups without `step_axis` are plain `torch.optim.AdamW` groups, stepped by torch itself, except
that `state_dtype="fp32"` (`_base.py`) keeps the moments of bf16 weights in fp32 and steps those
with torch's formula in fp32 (`upcast_adamw_step`); "param" is torch's own state, bf16 for bf16
weights, as the reference's StepAdamW. State is tensors only: a checkpoint loads with
`weights_only=True`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rankscope.optim._base import (
    evaluate_closure,
    load_state_keeping_dtypes,
    state_dtype_for,
    upcast_adamw_step,
    validate_state_dtype,
)

STEP_AXES = (0, 1)


class RowStepAdamW(torch.optim.AdamW):
    """AdamW whose groups with `step_axis` keep one step count per row (0) or column (1)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, state_dtype: str = "fp32") -> None:
        validate_state_dtype(state_dtype)
        self.state_dtype = state_dtype
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)
        for group in self.param_groups:
            axis = group.get("step_axis")
            if axis is not None and axis not in STEP_AXES:
                raise ValueError(f"invalid step_axis {axis!r}: use 0 (a count per row) or 1 (per column)")
            if axis is not None and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("a group with step_axis holds matrices only")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = evaluate_closure(closure)
        groups = self.param_groups
        plain, upcast = [], []
        for group in groups:
            if group.get("step_axis") is not None:
                continue
            # Weights whose state is wider than themselves (bf16 under state_dtype fp32) cannot go
            # through torch's kernel, which keeps state in the weight's dtype.
            wider = [p for p in group["params"] if p.grad is not None and self.state_dtype_of(p) != p.dtype]
            wider_ids = {id(p) for p in wider}
            plain.append({**group, "params": [p for p in group["params"] if id(p) not in wider_ids]} if wider else group)
            upcast += [(p, group) for p in wider]
        try:  # torch steps the plain groups: the same numbers as torch.optim.AdamW
            self.param_groups = plain
            super().step()
        finally:
            self.param_groups = groups
        for p, group in upcast:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = self._new_state(p)
                state["exp_avg_sq"] = self._new_state(p)
            upcast_adamw_step(p, state, group)
        for group in groups:
            if group.get("step_axis") is not None:
                self._row_step(group)
        return loss

    def _row_step(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "exp_avg" not in state:
                shape = (p.shape[0], 1) if group["step_axis"] == 0 else (1, p.shape[1])
                state["step"] = torch.zeros(shape, device=p.device, dtype=torch.float32)
                state["exp_avg"] = self._new_state(p)
                state["exp_avg_sq"] = self._new_state(p)
            if state["step"].device != p.device:  # a checkpoint loaded on the CPU keeps its counts there
                state["step"] = state["step"].to(p.device)
            step, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
            grad = p.grad.to(exp_avg.dtype)  # no copy unless the state is wider than the weight
            step.add_(1.0)
            if weight_decay != 0:
                p.mul_(1 - lr * weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = -lr / (1 - beta1 ** step)
            denominator = exp_avg_sq.sqrt().div_((1 - beta2 ** step).sqrt()).add_(eps).div_(step_size)
            p.addcdiv_(exp_avg, denominator)

    def state_dtype_of(self, p: torch.Tensor) -> torch.dtype:
        return state_dtype_for(p.dtype, self.state_dtype)

    def _new_state(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(p, dtype=self.state_dtype_of(p), memory_format=torch.preserve_format)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, with moments in `state_dtype_of(p)` (restored from the saved values) and each
        row / column step count as saved (it moves to the parameter's device at its next step)."""
        load_state_keeping_dtypes(self, state_dict, {}, self.state_dtype_of)
