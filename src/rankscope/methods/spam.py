"""SPAM: dense weights, Adam with momentum resets, spike-aware clipping and a warm-up after each reset.

The model stays the plain dense LLaMA; the method is its optimizer (`rankscope.optim.SPAM`), whose
resets, clipping and warm-up act on every parameter. Official code: TianjinYellow/SPAM-Optimizer
@e8185fb (galore_torch/SPAM.py; torchrun_main.py L325-357: every attention and MLP linear weight in
a group with `density`, all other parameters in a plain group placed first; scripts/{130m,350m,1b}.sh:
lr 8e-4 / 4e-4 / 2e-3, DeltaT 500, threshold 5000, density 1, weight decay 0, no gradient
clipping, lr warm-up 1000). The harness passes its lr warm-up (`--warmup_steps`, 1000) as the
optimizer's post-reset warm-up, while the README and `--warmup_epoch 150` name 150: `reset_warmup`
unset follows the harness (the run's lr warm-up steps), a number sets it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rankscope.methods._targets import check_targets, plain_first_groups
from rankscope.methods.base import Method, OptimDefaults, ResolvedOptim, require
from rankscope.models import TARGET_LINEARS
from rankscope.optim.spam import SPAM

# The scripts' lrs; 60M has no script (130M's value), 7B neither (1B's).
_LR = {"60m": 8e-4, "130m": 8e-4, "350m": 4e-4, "1b": 2e-3, "7b": 2e-3}


@dataclass
class SPAMSettings:
    reset_every: int = 500  # DeltaT
    spike_threshold: float = 5000.0  # threshold (theta); 0 turns the clipping off
    # The post-reset warm-up Nw; None: the run's lr warm-up steps, as the official harness passes.
    reset_warmup: int | None = None
    clip_start: int = 20  # grad_accu_steps: no clipping in the first 20 updates of a cycle
    targets: list[str] = field(default_factory=lambda: list(TARGET_LINEARS))


class SPAMMethod(Method):
    name = "spam"
    period_setting = "reset_every"
    warmup_settings = ("reset_warmup",)
    description = "SPAM: dense weights, Adam with momentum resets, spike-aware clipping and a post-reset warm-up."
    Settings = SPAMSettings

    @classmethod
    def default_settings(cls, preset: str, model_config) -> SPAMSettings:
        return SPAMSettings()

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        # Below 60M nothing is published: 130M's lr.
        return OptimDefaults(lr=_LR.get(preset.strip().lower(), 8e-4), weight_decay=0.0, eps=1e-6, grad_clip=0.0)

    def validate(self) -> None:
        s = self.settings
        check_targets(s.targets, self.model_config)
        for key in ("reset_every", "clip_start"):
            value = getattr(s, key)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                    f"method.{key} = {value!r} must be an integer >= 0")
        require(s.reset_warmup is None or (isinstance(s.reset_warmup, int) and s.reset_warmup >= 0),
                f"method.reset_warmup = {s.reset_warmup!r} must be an integer >= 0, or unset (the lr warm-up)")
        require(isinstance(s.spike_threshold, (int, float)) and s.spike_threshold >= 0,
                f"method.spike_threshold = {s.spike_threshold!r} must be >= 0 (5000 in the paper; 0: no clipping)")

    def build_optimizer(self, model: nn.Module, optim: ResolvedOptim) -> torch.optim.Optimizer:
        s = self.settings
        groups = plain_first_groups(model, s.targets, optim.weight_decay_scope, self.name, {"density": 1.0})
        warmup = optim.warmup_steps if s.reset_warmup is None else s.reset_warmup
        return SPAM(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                    reset_every=s.reset_every, spike_threshold=float(s.spike_threshold), reset_warmup=warmup,
                    clip_start=s.clip_start, state_dtype=optim.state_dtype)
