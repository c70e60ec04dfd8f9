"""GaLore: dense weights, Adam moments kept in a low-rank projection of each gradient.

The model stays the plain dense LLaMA; all the method does is put the targeted weights into a
`GaLoreAdamW` param group carrying rank / update_proj_gap / scale / proj_type. The projector
refresh (every `update_proj_gap` steps, from the SVD of that step's gradient) happens inside the
optimizer and its projectors are optimizer state, so they are saved and resumed with it.
Literature settings (Zhao et al. 2024, scripts/benchmark_c4): lr 0.01, scale 0.25, T 200,
r 128/256/256/512 at 60M/130M/350M/1B, weight decay 0, no gradient clipping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from rankscope.methods._targets import check_rank_fits, check_targets, literature_rank, targeted_linears
from rankscope.methods.base import Method, OptimDefaults, ResolvedOptim, require, scope_weight_decay, split_targeted
from rankscope.models import TARGET_LINEARS
from rankscope.optim import GaLoreAdamW
from rankscope.optim.projector import PROJ_TYPES, SVD_KINDS


@dataclass
class ProjectedGradientSettings:
    """The settings GaLore and Fira share (the projector and its refresh)."""

    rank: int = 128
    update_proj_gap: int = 200
    proj_type: str = "std"
    # GaLore keeps the moments as they are when the projector changes; True rotates them into
    # the new basis instead (an option, not the reference behaviour).
    reproject_moments: bool = False
    # The reference refreshes from an exact SVD; "randomized" uses torch.svd_lowrank with
    # rank + svd_oversample columns and svd_niter power iterations (faster, approximate subspace:
    # `rankscope bench optimizer` reports its subspace error).
    svd: str = "exact"
    svd_oversample: int = 8
    svd_niter: int = 2
    targets: list[str] = field(default_factory=lambda: list(TARGET_LINEARS))


@dataclass
class GaLoreSettings(ProjectedGradientSettings):
    scale: float = 0.25


class ProjectedGradientMethod(Method):
    """Shared by GaLore and Fira: dense model, one optimizer group of projected weights."""

    optimizer_class: ClassVar[type[torch.optim.Optimizer]]
    allowed_proj_types: ClassVar[tuple[str, ...]] = PROJ_TYPES
    period_setting = "update_proj_gap"

    @classmethod
    def default_settings(cls, preset: str, model_config: Any) -> Any:
        return cls.Settings(rank=literature_rank(preset, model_config))

    def validate(self) -> None:
        s = self.settings
        check_targets(s.targets, self.model_config)
        check_rank_fits(s.rank, s.targets, self.model_config)
        require(isinstance(s.update_proj_gap, int) and s.update_proj_gap >= 1,
                f"method.update_proj_gap = {s.update_proj_gap!r} must be an integer >= 1 (steps between projector refreshes)")
        require(s.proj_type in self.allowed_proj_types,
                f"method.proj_type = {s.proj_type!r} is not supported by {self.name}; "
                f"use one of {', '.join(self.allowed_proj_types)}")
        require(s.svd in SVD_KINDS, f"method.svd = {s.svd!r} is not a projector refresh; use one of {', '.join(SVD_KINDS)}")
        for key in ("svd_oversample", "svd_niter"):
            value = getattr(s, key)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                    f"method.{key} = {value!r} must be an integer >= 0")

    def projected_group_keys(self) -> dict[str, Any]:
        s = self.settings
        return {"rank": s.rank, "update_proj_gap": s.update_proj_gap, "proj_type": s.proj_type,
                "reproject_moments": s.reproject_moments, "svd": s.svd,
                "svd_oversample": s.svd_oversample, "svd_niter": s.svd_niter}

    def build_optimizer(self, model: nn.Module, optim: ResolvedOptim) -> torch.optim.Optimizer:
        modules = [module for _, module in targeted_linears(model, self.settings.targets)]
        require(len(modules) > 0, f"{self.name}: method.targets matched no linear layer of the model; fix method.targets")
        projected, rest = split_targeted(model, modules)
        groups = [{"params": projected, "name": self.name, **self.projected_group_keys()}]
        if rest:
            groups += scope_weight_decay([{"params": rest, "name": "adamw"}], model, optim.weight_decay_scope)
        return self.optimizer_class(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                    weight_decay=optim.weight_decay, state_dtype=optim.state_dtype)


class GaLore(ProjectedGradientMethod):
    name = "galore"
    color = "#0072B2"
    description = "GaLore: dense weights, Adam in a rank-r SVD projection of each gradient (refreshed every T steps)."
    Settings = GaLoreSettings
    optimizer_class = GaLoreAdamW

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        # GaLore's torchrun_main defaults grad_clipping to 0.0 (off) and its C4 scripts keep it.
        return OptimDefaults(lr=0.01, weight_decay=0.0, eps=1e-6, grad_clip=0.0)

    def validate(self) -> None:
        super().validate()
        require(isinstance(self.settings.scale, (int, float)) and self.settings.scale > 0,
                f"method.scale = {self.settings.scale!r} must be > 0 (GaLore's update scale, 0.25 in the paper)")

    def projected_group_keys(self) -> dict[str, Any]:
        return {**super().projected_group_keys(), "scale": float(self.settings.scale)}
