"""AdamW: torch.optim.AdamW's numbers, with the state dtype as a setting.

torch.optim.AdamW keeps exp_avg / exp_avg_sq in the parameter's dtype (`torch.zeros_like(p)`),
so on bf16 weights (train.precision=bf16-pure) its second moment cannot decay (see `_base.py`).
This optimizer steps every group as torch's AdamW does: through torch's own functional kernel
where the state has the parameter's dtype (fp32 weights under either setting, bf16 weights under
`state_dtype="param"`: bit for bit torch.optim.AdamW), and with the same formula in fp32 where
`state_dtype="fp32"` widens the state of bf16 weights. It is the optimizer of every method whose
official harness uses torch.optim.AdamW (full rank, LoRA, ReLoRA, SLTrain, CoLA, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from rankscope.optim._base import RankscopeOptimizer, evaluate_closure


class AdamW(RankscopeOptimizer):
    """torch.optim.AdamW (decoupled weight decay, its defaults) with `state_dtype` "fp32" | "param"."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        state_dtype: str = "fp32",
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            self._plain_adamw_step(group)
        return loss
