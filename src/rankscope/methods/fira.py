"""Fira: GaLore's low-rank Adam plus a norm-scaled full-rank residual of the gradient.

Dense model; the targeted weights go into one `FiraAdamW` group (rank / update_proj_gap / alpha /
proj_type). The residual scaling, the norm-growth limiter and the projector refresh live in the
optimizer and its state. Literature settings (Chen et al. 2024, Fira's C4 scripts): lr 0.01,
T 200, alpha 0.25 with r 128/256/256 at 60M/130M/350M; 1B r 512 with alpha 0.0625.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rankscope.methods._targets import literature_rank
from rankscope.methods.base import OptimDefaults, require
from rankscope.methods.galore import ProjectedGradientMethod, ProjectedGradientSettings
from rankscope.optim import FiraAdamW
from rankscope.optim.fira import FIRA_PROJ_TYPES


@dataclass
class FiraSettings(ProjectedGradientSettings):
    alpha: float = 0.25


class Fira(ProjectedGradientMethod):
    name = "fira"
    color = "#009E73"
    description = "Fira: GaLore's projected Adam plus a norm-scaled full-rank gradient residual."
    Settings = FiraSettings
    optimizer_class = FiraAdamW
    allowed_proj_types = FIRA_PROJ_TYPES

    @classmethod
    def default_settings(cls, preset: str, model_config: Any) -> FiraSettings:
        # Fira scales alpha down with the larger rank at 1B (0.0625 with r = 512).
        alpha = 0.0625 if preset.strip().lower() == "1b" else 0.25
        return FiraSettings(rank=literature_rank(preset, model_config), alpha=alpha)

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        # Fira's training script is GaLore's: grad clipping off by default.
        return OptimDefaults(lr=0.01, weight_decay=0.0, eps=1e-6, grad_clip=0.0)

    def validate(self) -> None:
        super().validate()
        require(isinstance(self.settings.alpha, (int, float)) and self.settings.alpha > 0,
                f"method.alpha = {self.settings.alpha!r} must be > 0 (Fira's scale, 0.25 in the paper)")

    def projected_group_keys(self) -> dict[str, Any]:
        return {**super().projected_group_keys(), "alpha": float(self.settings.alpha)}
