"""Vanilla low-rank factorization W = B·A (the LORO paper's "Low-rank" baseline).

Both factors are trained with AdamW from a Xavier init; the method is known to be spiky and
to reach a poor perplexity. `refactor_every` adds Glentis et al.'s weight refactorization with
momentum reset (methods/refactor.py). It is also the simplest member of the factorized family, so the
helpers the other factorized methods (lora, relora, sltrain, cola) share live here: settings
validation and the two-group AdamW. The literature ranks come from `_targets`, shared with the
optimizer-based methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rankscope.methods._targets import check_rank_fits, check_targets, literature_rank
from rankscope.methods.base import Method, OptimDefaults, ResolvedOptim, require, scope_weight_decay, split_targeted
from rankscope.methods.refactor import Refactoring, RefactorSettings
from rankscope.models import TARGET_LINEARS, LlamaConfig
from rankscope.nn import LowRankLinear, ParameterizedLinear, replace_linears
from rankscope.optim import AdamW


def default_targets() -> list[str]:
    return list(TARGET_LINEARS)


def validate_targets_and_rank(targets: list[str], rank: int, model_config: LlamaConfig) -> None:
    """Targets are projections of the model, each listed once, and the rank is below every
    targeted min(d_in, d_out) (otherwise nothing is low-rank)."""
    check_targets(targets, model_config)
    require(len(set(targets)) == len(targets), f"method.targets lists a projection twice: {targets}; list each once")
    check_rank_fits(rank, targets, model_config)


def parameterized_layers(model: nn.Module) -> list[ParameterizedLinear]:
    return [m for m in model.modules() if isinstance(m, ParameterizedLinear)]


def two_group_adamw(
    model: nn.Module, optim: ResolvedOptim, extra_groups: list[dict] | None = None
) -> AdamW:
    """AdamW (torch's numbers, `optim.state_dtype` state) with the targeted layers' trainable tensors in one group and everything else
    (embeddings, head, norms, untargeted linears) in another; frozen tensors in none.

    ``extra_groups`` hold parameters that already sit in a parameterized layer but need their own
    group (ReLoRA's warm-start W0); they are taken out of the targeted group.
    """
    inside, outside = split_targeted(model, parameterized_layers(model))
    claimed = {id(p) for group in (extra_groups or []) for p in group["params"]}
    groups = [
        {"params": [p for p in inside if id(p) not in claimed], "name": "targeted"},
        {"params": outside, "name": "other"},
        *(extra_groups or []),
    ]
    groups = scope_weight_decay([g for g in groups if g["params"]], model, optim.weight_decay_scope)
    return AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                 state_dtype=optim.state_dtype)


@dataclass
class LowRankSettings(RefactorSettings):
    rank: int = 128
    targets: list[str] = field(default_factory=default_targets)


class LowRank(Refactoring, Method):
    name = "lowrank"
    color = "#8C564B"
    description = "Vanilla low-rank W = B·A, both factors trained with AdamW from Xavier init."
    Settings = LowRankSettings

    @classmethod
    def default_settings(cls, preset: str, model_config: LlamaConfig) -> LowRankSettings:
        return LowRankSettings(rank=literature_rank(preset, model_config))

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        # The LORO paper reprints GaLore's low-rank numbers; GaLore's harness (torchrun_main.py:
        # --grad_clipping default 0.0, no script sets it) and LORO's own (run_c4.py, same default)
        # do not clip. AdamW lr 1e-3, wd 0; the same lr trains the tiny preset.
        return OptimDefaults(lr=1e-3, weight_decay=0.0, eps=1e-8, grad_clip=0.0)

    def validate(self) -> None:
        validate_targets_and_rank(self.settings.targets, self.settings.rank, self.model_config)
        self.validate_refactoring()

    def parameterize(self, model: nn.Module) -> nn.Module:
        rank = self.settings.rank
        replace_linears(
            model, lambda name, linear: LowRankLinear.from_linear(linear, rank, name=name), self.settings.targets
        )
        return model

    def build_optimizer(self, model: nn.Module, optim: ResolvedOptim) -> torch.optim.Optimizer:
        self.remember_total_steps(optim)
        return two_group_adamw(model, optim)
