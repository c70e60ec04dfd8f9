"""Weight refactorization with momentum reset, for the factored methods lowrank and sltrain.

Glentis et al. 2025 (arXiv 2505.22922; OptimAI-Lab/Memory_Efficient_Pretraining @9f803d4,
torchrun_main_DDP.py L756-796, para_eff_pt/pt_sltrain/splora_model.py `merge_and_reinit` L309-341,
para_eff_pt/peft_pretraining/training_utils.py L247-302). After every `refactor_every`-th update:

1. every factored layer's B·A (fp32) is factored again from its SVD, B <- U_r·√Σ_r and
   A <- √Σ_r·V_rᵀ: the product is unchanged (to rounding), the factors balanced (BᵀB = AAᵀ = Σ_r);
   the scale s and SLTrain's sparse values are left alone;
2. the optimizer state is cleared (`reset_optimizer`: all = the official new optimizer over every
   trainable tensor; factors = only the refactored B and A; none);
3. the lr schedule becomes the official "quick recovery" one: within `recovery_steps` R of a
   refactor point p the multiplier is λ(p + R)·(f + (1 − f)·(s − p)/(R − 1)), f = `recovery_floor`
   0.001, λ the run's cosine. As in the official code (whose scheduler, re-created after the
   refactor at p, is that schedule from then on), it applies to updates p + 1 … p + R − 1 after
   the first refactor and also to update p itself at every later refactor point.

The official code runs it for SLTrain only (its low-rank layer has no merge_and_reinit); the
paper applies it to the low-rank method too. The period is in no released script (its default
65000 is off for the 11K-step runs): `refactor_every` 0 (off) is the default, and docs/methods.md
gives the measured sweep. Deterministic (no random draw), so a resumed run repeats it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankscope.methods.base import ResolvedOptim, require
from rankscope.optim.sharded import full_parameters

RESET_MODES = ("all", "factors", "none")


@dataclass
class RefactorSettings:
    refactor_every: int = 0  # updates between refactorizations; 0 = never (no released script sets it)
    reset_optimizer: str = "all"  # official: a new optimizer over every trainable tensor
    recovery_steps: int = 10  # official --recovery_steps default
    recovery_floor: float = 0.001  # official: the recovery starts at 0.001 x its target


@torch.no_grad()
def refactor_factors(B: torch.Tensor, A: torch.Tensor) -> None:
    """B <- U_r·√Σ_r, A <- √Σ_r·V_rᵀ from the SVD of B·A in fp32 (in place, in the factors' dtype)."""
    rank = A.shape[0]
    u, sigma, vh = torch.linalg.svd((B @ A).float(), full_matrices=False)
    root = sigma[:rank].sqrt()
    B.copy_(u[:, :rank] * root)
    A.copy_(root.unsqueeze(1) * vh[:rank])


class Refactoring:
    """Mixin for a Method whose targeted layers hold factors B and A and whose settings extend
    RefactorSettings: the refactorization in `after_step`, the recovery windows in `lr_multiplier`."""

    settings: Any
    # Read as Method class attributes by the classes that mix this in (LowRank, SLTrain).
    period_setting = "refactor_every"
    warmup_settings = ("recovery_steps",)
    _refactor_total_steps: int | None = None

    def validate_refactoring(self) -> None:
        s = self.settings
        require(isinstance(s.refactor_every, int) and s.refactor_every >= 0,
                f"method.refactor_every = {s.refactor_every!r} must be an integer >= 0 (0 = never)")
        require(s.reset_optimizer in RESET_MODES,
                f"method.reset_optimizer = {s.reset_optimizer!r}: use one of {', '.join(RESET_MODES)} (all is official)")
        require(isinstance(s.recovery_steps, int) and s.recovery_steps >= 0,
                f"method.recovery_steps = {s.recovery_steps!r} must be an integer >= 0 (0 = no recovery window)")
        require(0.0 <= s.recovery_floor <= 1.0, f"method.recovery_floor = {s.recovery_floor!r} must be in [0, 1]")

    def remember_total_steps(self, optim: ResolvedOptim) -> None:
        self._refactor_total_steps = optim.total_steps

    def is_refactor_step(self, step: int) -> bool:
        every = self.settings.refactor_every
        total = self._refactor_total_steps
        return bool(every) and step % every == 0 and (total is None or step < total)

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not self.is_refactor_step(step):
            return
        modules = [module for module in model.modules()
                   if isinstance(getattr(module, "A", None), nn.Parameter) and isinstance(getattr(module, "B", None), nn.Parameter)]
        factors = [p for module in modules for p in (module.B, module.A)]
        with full_parameters(modules, names=("A", "B")):  # under FSDP: whole factors, written back by rows
            for module in modules:
                refactor_factors(module.B, module.A)
        mode = self.settings.reset_optimizer
        if mode == "none":
            return
        reset = {id(p) for p in factors} if mode == "factors" else None
        for group in optimizer.param_groups:
            for p in group["params"]:
                if reset is None or id(p) in reset:
                    optimizer.state.pop(p, None)

    def lr_multiplier(self, step: int, optim: ResolvedOptim) -> float:
        base = super().lr_multiplier  # type: ignore[misc]
        s = self.settings
        every, window = s.refactor_every, s.recovery_steps
        if not every or window < 1 or step <= every:
            return base(step, optim)
        point = step // every * every
        since = step - point
        if since >= window:
            return base(step, optim)
        progress = min(1.0, since / (window - 1)) if window > 1 else 1.0
        return base(point + window, optim) * (s.recovery_floor + (1.0 - s.recovery_floor) * progress)
