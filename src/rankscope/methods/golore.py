"""GoLore: GaLore whose projectors become uniformly random for the last part of training.

He et al. (arXiv 2410.11289) show that GaLore's SVD projector, taken from a gradient dominated by
noise late in training, need not converge, and that a random (Haar) projector does. The model is
the plain dense LLaMA; the targeted weights go into one `GoLoreAdamW` group after a plain group
(the order of pkumelon/Golore torchrun_main.py L585-601), with SVD refreshes every T steps until
`random_ratio` of the run and Haar-random ones after.

Official code: pkumelon/Golore @7ee5a8a, peft_pretraining/golore_torch/{adamw.py,
golore_projector.py}. Settings of script/Go_pt.sh (the only published pre-training run, 60M):
lr 1e-3, rank 128, T 200, scale 1.0, rand_ratio 0.8, clip_grad_norm 1.0 (the argparse default),
weight decay 0, eps 1e-6 (the optimizer's default), 10000 steps + 5000 extra with a cosine that
restarts every 10000 steps (random from step 8000 of 15000). rankscope's default runs the
`train.steps` convention of every method (random from 0.8 x steps, one cosine); the official
15K schedule is `train.steps 15000`, `method.random_from 8000`, `method.cycle_length 10000`.
At the other scales nothing is published: the rank is GaLore's literature rank, the rest is 60M's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankscope.methods._targets import plain_first_groups
from rankscope.methods.base import OptimDefaults, ResolvedOptim, require
from rankscope.methods.galore import GaLore, GaLoreSettings
from rankscope.optim.galore import MOMENT_MODES
from rankscope.optim.golore import GOLORE_PROJ_TYPES, GoLoreAdamW
from rankscope.optim.schedules import cyclical_cosine


@dataclass
class GoLoreSettings(GaLoreSettings):
    scale: float = 1.0
    # Official optimizer (golore_torch/adamw.py): the refresh step's update uses the rotated first
    # moment, the stored one is left as it was. "first" stores the rotation (GoLore's ReLoRA form).
    reproject_moments: str = "first_transient"
    random_ratio: float = 0.8  # the official rand_ratio: random projectors from this fraction of train.steps
    random_from: int | None = None  # the first step with random projectors; overrides random_ratio
    # None: rankscope's single cosine over train.steps; a length: the official cyclical cosine
    # (a warmup and a cosine per cycle, the scheduler stepped after each update as in the harness).
    cycle_length: int | None = None


class GoLore(GaLore):
    name = "golore"
    color = None  # not GaLore's: a colour of its own, derived from the name
    description = "GoLore: GaLore with Haar-random projectors for the last part of training (SVD before)."
    Settings = GoLoreSettings
    optimizer_class = GoLoreAdamW
    allowed_proj_types = GOLORE_PROJ_TYPES

    def __init__(self, settings: GoLoreSettings, model_config: Any, preset: str = "tiny"):
        super().__init__(settings, model_config, preset)
        self._projection_seed = 0

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        return OptimDefaults(lr=1e-3, weight_decay=0.0, eps=1e-6, grad_clip=1.0)

    def validate(self) -> None:
        super().validate()
        s = self.settings
        require(s.reproject_moments in MOMENT_MODES,
                f"method.reproject_moments = {s.reproject_moments!r}: use one of {', '.join(MOMENT_MODES)} "
                "(first_transient is the official optimizer's)")
        require(isinstance(s.random_ratio, (int, float)) and s.random_ratio >= 0,
                f"method.random_ratio = {s.random_ratio!r} must be >= 0 (0.8 officially; above 1 = never random)")
        require(s.random_from is None or (isinstance(s.random_from, int) and s.random_from >= 0),
                f"method.random_from = {s.random_from!r} must be a step >= 0 or null (= random_ratio x train.steps)")
        require(s.cycle_length is None or (isinstance(s.cycle_length, int) and s.cycle_length >= 1),
                f"method.cycle_length = {s.cycle_length!r} must be an integer >= 1 or null (one cosine over the run)")

    def random_from_step(self, total_steps: int) -> int:
        """The first step (counted as steps taken before it) whose refresh draws a random projector:
        the reference's `step >= rand_ratio * num_training_steps` for an integer step."""
        s = self.settings
        return s.random_from if s.random_from is not None else math.ceil(s.random_ratio * total_steps)

    def parameterize(self, model: nn.Module) -> nn.Module:
        # The run's seed (the trainer seeds the global RNG just before), read without drawing, so
        # GoLore leaves the global random stream exactly as GaLore does.
        self._projection_seed = torch.initial_seed() % 2**63
        return model

    def build_optimizer(self, model: nn.Module, optim: ResolvedOptim) -> torch.optim.Optimizer:
        if optim.warmup_steps and self.settings.cycle_length is not None:
            require(optim.warmup_steps <= self.settings.cycle_length,
                    f"optim.warmup_steps {optim.warmup_steps} must not exceed method.cycle_length "
                    f"{self.settings.cycle_length}")
        keys = {**self.projected_group_keys(), "random_from_step": self.random_from_step(optim.total_steps),
                "projection_seed": self._projection_seed}
        groups = plain_first_groups(model, self.settings.targets, optim.weight_decay_scope, self.name, keys)
        return GoLoreAdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                           state_dtype=optim.state_dtype)

    def lr_multiplier(self, step: int, optim: ResolvedOptim) -> float:
        if self.settings.cycle_length is None:
            return super().lr_multiplier(step, optim)
        # The harness steps its scheduler after each update: update `step` (1-based) gets λ(step - 1).
        return cyclical_cosine(step - 1, self.settings.cycle_length, optim.warmup_steps, optim.min_lr_ratio)
