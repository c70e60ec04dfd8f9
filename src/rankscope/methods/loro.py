"""LORO: native low-rank W = B·A trained with the low-rank Riemannian optimizer.

The targeted linears become `LowRankLinear` (Xavier-initialised factors); every factor pair
[B, A] goes into one `LoroAdamW` group with `factor_pairs=True`. The optimizer does everything
periodic itself: Adam-normalized factor steps scaled by c = r / d_model, the exact Riemannian
step every K = `exact_every` steps, the reset of the factor moments afterwards and the linear lr
re-warm over `rewarm_steps` steps. That bookkeeping is optimizer state, so it is saved and
resumed with the optimizer; this method adds no schedule of its own.
Literature settings (Mo et al. 2025, seeds/003): lr 0.01 (1B 0.005), K 500 (1B 200),
re-warm 5 steps, r 128/256/256/512 at 60M/130M/350M/1B.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankscope.methods._targets import check_rank_fits, check_targets, literature_rank
from rankscope.methods.base import Method, OptimDefaults, ResolvedOptim, require
from rankscope.models import TARGET_LINEARS
from rankscope.nn import LowRankLinear, replace_linears
from rankscope.nn.lowrank import LOWRANK_INITS
from rankscope.optim import LoroAdamW
from rankscope.optim.loro import EXACT_DIRECTIONS


@dataclass
class LoroSettings:
    rank: int = 128
    exact_every: int = 500
    rewarm_steps: int = 5
    # "adam": the exact step follows the Adam-normalized factor directions (official code);
    # "grad": the raw factor gradients (the paper's Algorithm 2).
    exact_direction: str = "adam"
    exact_lr_scale: float = 1.0
    init: str = "xavier"
    targets: list[str] = field(default_factory=lambda: list(TARGET_LINEARS))


class NativeLowRankMethod(Method, abc.ABC):
    """Shared by LORO and Spectron: targeted linears become B·A, factor pairs form one group."""

    def validate(self) -> None:
        s = self.settings
        check_targets(s.targets, self.model_config)
        check_rank_fits(s.rank, s.targets, self.model_config)
        require(s.init in LOWRANK_INITS, f"method.init = {s.init!r} is unknown; use one of {', '.join(LOWRANK_INITS)}")

    def parameterize(self, model: nn.Module) -> nn.Module:
        rank, init = self.settings.rank, self.settings.init
        replace_linears(
            model,
            lambda name, linear: LowRankLinear.from_linear(linear, rank, init, name=name),
            self.settings.targets,
        )
        return model

    @abc.abstractmethod
    def factor_group_keys(self) -> dict[str, Any]:
        """The optimizer-specific keys of the factor-pair param group."""

    def build_optimizer(self, model: nn.Module, optim: ResolvedOptim) -> torch.optim.Optimizer:
        pairs: list[nn.Parameter] = []
        for module in model.modules():
            if isinstance(module, LowRankLinear):
                pairs += [module.B, module.A]  # the optimizer reads the group as [B0, A0, B1, A1, ...]
        require(len(pairs) > 0, f"{self.name}: the model has no low-rank layer; call parameterize() first")
        in_pairs = {id(p) for p in pairs}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_pairs]
        groups = [{"params": pairs, "name": self.name, "factor_pairs": True, **self.factor_group_keys()}]
        if rest:
            groups.append({"params": rest, "name": "adamw"})
        return self.optimizer_class(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                    weight_decay=optim.weight_decay)


class LORO(NativeLowRankMethod):
    name = "loro"
    description = "LORO: W = B·A with Adam factor steps and an exact rank-r Riemannian step every K steps."
    Settings = LoroSettings
    optimizer_class = LoroAdamW

    @classmethod
    def default_settings(cls, preset: str, model_config: Any) -> LoroSettings:
        is_1b = preset.strip().lower() == "1b"
        return LoroSettings(rank=literature_rank(preset, model_config), exact_every=200 if is_1b else 500)

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        lr = 0.005 if preset.strip().lower() == "1b" else 0.01
        # LORO follows GaLore's C4 harness (Zhao et al. 2024, App. C.1): wd 0, clipping off.
        return OptimDefaults(lr=lr, weight_decay=0.0, eps=1e-6, grad_clip=0.0)

    def validate(self) -> None:
        super().validate()
        s = self.settings
        require(isinstance(s.exact_every, int) and s.exact_every >= 1,
                f"method.exact_every = {s.exact_every!r} must be an integer >= 1 (steps between exact LORO steps)")
        require(isinstance(s.rewarm_steps, int) and s.rewarm_steps >= 0,
                f"method.rewarm_steps = {s.rewarm_steps!r} must be an integer >= 0")
        require(s.exact_direction in EXACT_DIRECTIONS,
                f"method.exact_direction = {s.exact_direction!r} is unknown; use one of {', '.join(EXACT_DIRECTIONS)}")
        require(isinstance(s.exact_lr_scale, (int, float)) and s.exact_lr_scale > 0,
                f"method.exact_lr_scale = {s.exact_lr_scale!r} must be > 0")

    def factor_group_keys(self) -> dict[str, Any]:
        s = self.settings
        return {
            "exact_every": s.exact_every, "rewarm_steps": s.rewarm_steps,
            "exact_direction": s.exact_direction, "exact_lr_scale": float(s.exact_lr_scale),
            # c = r / d_model for the approximate steps, as the paper's eq. 11.
            "d_model": self.model_config.hidden_size,
        }
