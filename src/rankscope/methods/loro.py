"""LORO: native low-rank W = B·A trained with the low-rank Riemannian optimizer.

The targeted linears become `LowRankLinear` (Xavier-normal factors, as LORO-main's
LowRankLinear "xavier"); every factor pair [B, A] goes into one `LoroAdamW` group with
`factor_pairs=True`, everything else into LoroAdamW's plain groups (the official optimizer's
regular Adam). The optimizer does the Adam-normalized factor steps scaled by c = r / d_model,
the exact Riemannian step every K = `exact_every` steps and the refresh of the Adam states after
every `refresh_every` steps (default K): all of it optimizer state, saved and resumed with it.

The schedule is the method's: `schedule="official"` is LORO's cosine_restart exactly as its
scripts run it (rankscope.optim.schedules.loro_cosine_restart, restart cycle = refresh_every,
re-warm over `rewarm_steps` steps from ~0 for every param group, the cosine displaced by
`lr_adjust_ratio` of the run, update k at scheduler step k - 1); `schedule="ours"` is rankscope's
cosine with warmup, with every group re-warmed linearly over `rewarm_steps` updates after each
refresh. Defaults and sources per setting: docs/methods.md.

"LORO + slim MLP" (a dense MLP of width mlp_rank next to low-rank attention, reachable in
LORO-main only through a stale code path) is a composition of existing settings:
method.targets=[q_proj,k_proj,v_proj,o_proj] with model.overrides.intermediate_size=<width>.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankscope.methods._targets import check_rank_fits, check_targets, literature_rank, short_name
from rankscope.methods.base import Method, OptimDefaults, ResolvedOptim, require, scope_weight_decay
from rankscope.models import TARGET_LINEARS
from rankscope.nn import LowRankLinear, replace_linears
from rankscope.nn.lowrank import LOWRANK_INITS
from rankscope.optim import LoroAdamW
from rankscope.optim.loro import EXACT_DIRECTIONS, REFRESH_SCOPES
from rankscope.optim.schedules import cosine_with_warmup, loro_cosine_restart

LORO_SCHEDULES = ("official", "ours")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class LoroSettings:
    rank: int = 128
    # Rank of the MLP projections; None = rank (official --loro_mlp_rank, = attention rank in the scripts).
    mlp_rank: int | None = None
    exact_every: int = 500
    refresh: str = "all"
    # Steps between refreshes (and LR restarts); None = exact_every, as the scripts pass one $freq.
    refresh_every: int | None = None
    schedule: str = "official"
    rewarm_steps: int = 5
    # The official schedule's cosine displacement as a fraction of the run (scripts: -10%).
    lr_adjust_ratio: float = -0.1
    # "adam": the exact step follows the Adam-normalized factor directions (official code);
    # "grad": the raw factor gradients (the paper's Algorithm 2).
    exact_direction: str = "adam"
    exact_lr_scale: float = 1.0
    init: str = "xavier_normal"
    targets: list[str] = field(default_factory=lambda: list(TARGET_LINEARS))


class NativeLowRankMethod(Method, abc.ABC):
    """Shared by LORO and Spectron: targeted linears become B·A, factor pairs form one group."""

    def rank_for(self, target: str) -> int:
        """The rank of a targeted projection ("q_proj" or "layers.0.mlp.up_proj")."""
        return self.settings.rank

    def validate(self) -> None:
        s = self.settings
        check_targets(s.targets, self.model_config)
        for rank in sorted({self.rank_for(t) for t in s.targets}):
            same_rank = [t for t in s.targets if self.rank_for(t) == rank]
            check_rank_fits(rank, same_rank, self.model_config, "method.rank" if rank == s.rank else "method.mlp_rank")
        require(s.init in LOWRANK_INITS, f"method.init = {s.init!r} is unknown; use one of {', '.join(LOWRANK_INITS)}")

    def parameterize(self, model: nn.Module) -> nn.Module:
        init = self.settings.init
        replace_linears(
            model,
            lambda name, linear: LowRankLinear.from_linear(linear, self.rank_for(name), init, name=name),
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
            groups += scope_weight_decay([{"params": rest, "name": "adamw"}], model, optim.weight_decay_scope)
        return self.optimizer_class(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                    weight_decay=optim.weight_decay, state_dtype=optim.state_dtype)


class LORO(NativeLowRankMethod):
    name = "loro"
    color = "#7B3FA0"
    period_setting = "exact_every"
    warmup_settings = ("rewarm_steps",)
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
        # LORO-main scripts/loro_c4: wd 0, run_c4.py's --grad_clipping default 0.0, LOROAdamW eps 1e-6.
        return OptimDefaults(lr=lr, weight_decay=0.0, eps=1e-6, grad_clip=0.0)

    def rank_for(self, target: str) -> int:
        mlp_rank = self.settings.mlp_rank
        return mlp_rank if mlp_rank is not None and short_name(target) in MLP_TARGETS else self.settings.rank

    @property
    def refresh_every(self) -> int:
        return self.settings.refresh_every or self.settings.exact_every

    def validate(self) -> None:
        super().validate()
        s = self.settings
        require(isinstance(s.exact_every, int) and s.exact_every >= 1,
                f"method.exact_every = {s.exact_every!r} must be an integer >= 1 (steps between exact LORO steps)")
        require(s.refresh_every is None or (isinstance(s.refresh_every, int) and s.refresh_every >= 1),
                f"method.refresh_every = {s.refresh_every!r} must be an integer >= 1 (or null = exact_every)")
        require(s.refresh in REFRESH_SCOPES,
                f"method.refresh = {s.refresh!r} is unknown; use one of {', '.join(REFRESH_SCOPES)}")
        require(s.schedule in LORO_SCHEDULES,
                f"method.schedule = {s.schedule!r} is unknown; use one of {', '.join(LORO_SCHEDULES)}")
        require(isinstance(s.rewarm_steps, int) and 0 <= s.rewarm_steps < self.refresh_every,
                f"method.rewarm_steps = {s.rewarm_steps!r} must be an integer in [0, refresh_every="
                f"{self.refresh_every}): the re-warm has to end before the next refresh")
        require(isinstance(s.lr_adjust_ratio, (int, float)) and -1.0 < s.lr_adjust_ratio <= 0.0,
                f"method.lr_adjust_ratio = {s.lr_adjust_ratio!r} must be in (-1, 0] (the scripts use -0.1)")
        require(s.exact_direction in EXACT_DIRECTIONS,
                f"method.exact_direction = {s.exact_direction!r} is unknown; use one of {', '.join(EXACT_DIRECTIONS)}")
        require(isinstance(s.exact_lr_scale, (int, float)) and s.exact_lr_scale > 0,
                f"method.exact_lr_scale = {s.exact_lr_scale!r} must be > 0")

    def factor_group_keys(self) -> dict[str, Any]:
        s = self.settings
        return {
            "exact_every": s.exact_every, "refresh": s.refresh, "refresh_every": self.refresh_every,
            "exact_direction": s.exact_direction, "exact_lr_scale": float(s.exact_lr_scale),
            # c = r / d_model for the approximate steps, as the paper's eq. 11 (scripts: --loro_lr_scaler -1).
            "d_model": self.model_config.hidden_size,
        }

    def build_optimizer(self, model: nn.Module, optim: ResolvedOptim) -> torch.optim.Optimizer:
        self.lr_multiplier(1, optim)  # the official schedule checks its arguments: fail before training
        return super().build_optimizer(model, optim)

    def lr_multiplier(self, step: int, optim: ResolvedOptim) -> float:
        s = self.settings
        if s.schedule == "official":
            # run_c4.py steps the scheduler after each update: update k uses scheduler step k - 1.
            return loro_cosine_restart(
                step - 1, optim.total_steps, optim.warmup_steps, optim.min_lr_ratio,
                restart_every=self.refresh_every, restart_warmup=s.rewarm_steps,
                adjust_steps=round(s.lr_adjust_ratio * optim.total_steps),
            )
        envelope = cosine_with_warmup(step, optim.total_steps, optim.warmup_steps, optim.min_lr_ratio)
        since_refresh = step - (step - 1) // self.refresh_every * self.refresh_every
        if step > self.refresh_every and since_refresh <= s.rewarm_steps:
            return envelope * since_refresh / s.rewarm_steps
        return envelope
