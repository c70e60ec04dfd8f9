"""Stable-SPAM: dense weights, Adam with adaptive spike clipping, norm normalisation and resets.

The model stays the plain dense LLaMA; the method is its optimizer (`rankscope.optim.StableSPAM`),
applied to every trainable parameter alike as the official harness does (TianjinYellow/StableSPAM
@6a66da1, utils/setup.py L179: `StableSPAM(trainable_params, lr, weight_decay, gamma1, gamma2,
gamma3, eta_min, update_proj_gap, total_T)`). Defaults are those of the one published pre-training
script (scripts_BF16/stablespam.sh, LLaMA-130M): lr 8e-4, gamma1 0.85, gamma2 0.99999, gamma3
0.999, update_proj_gap 1000, eta 0.5, total_T the argparse default 20000 = its 20K steps (here:
the run's steps), weight decay 0, no gradient clipping, eps 1e-8 (the optimizer's default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankscope.methods.base import Method, OptimDefaults, ResolvedOptim, require, scope_weight_decay
from rankscope.optim.stable_spam import StableSPAM


@dataclass
class StableSPAMSettings:
    gamma1: float = 0.85  # the norm's first-moment decay (times the sigma schedule)
    gamma2: float = 0.99999  # the norm's second-moment decay
    gamma3: float = 0.999  # the spike threshold's decay
    eta_min: float = 0.5  # the floor of the sigma schedule
    reset_every: int = 1000  # update_proj_gap: momentum reset period (0: none)
    # T of the sigma schedule; None: the run's steps (the script's total_T equals its steps).
    total_steps: int | None = None


class StableSPAMMethod(Method):
    name = "stable_spam"
    period_setting = "reset_every"
    description = "Stable-SPAM: dense weights, Adam with adaptive spike clipping, norm normalisation and resets."
    Settings = StableSPAMSettings
    fsdp_refusal = ("its spike clipping and norm normalisation use the maximum and the norm of each whole gradient, "
                    "reductions across FSDP's row shards that are not implemented")

    @classmethod
    def default_settings(cls, preset: str, model_config) -> StableSPAMSettings:
        return StableSPAMSettings()

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        # Only the 130M script is published; its lr for every preset.
        return OptimDefaults(lr=8e-4, weight_decay=0.0, eps=1e-8, grad_clip=0.0)

    def validate(self) -> None:
        s = self.settings
        for key in ("gamma1", "gamma2", "gamma3", "eta_min"):
            value = getattr(s, key)
            require(isinstance(value, (int, float)) and 0.0 <= value < 1.0, f"method.{key} = {value!r} must be in [0, 1)")
        require(isinstance(s.reset_every, int) and s.reset_every >= 0,
                f"method.reset_every = {s.reset_every!r} must be an integer >= 0 (0: no momentum resets)")
        require(s.total_steps is None or (isinstance(s.total_steps, int) and s.total_steps >= 1),
                f"method.total_steps = {s.total_steps!r} must be an integer >= 1, or unset (the run's steps)")

    def build_optimizer(self, model: nn.Module, optim: ResolvedOptim) -> torch.optim.Optimizer:
        s = self.settings
        params = [p for p in model.parameters() if p.requires_grad]
        groups = scope_weight_decay([{"params": params, "name": "stable_spam"}], model, optim.weight_decay_scope)
        return StableSPAM(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                          gamma1=s.gamma1, gamma2=s.gamma2, gamma3=s.gamma3, eta_min=s.eta_min,
                          reset_every=s.reset_every, total_steps=s.total_steps or optim.total_steps,
                          state_dtype=optim.state_dtype)
