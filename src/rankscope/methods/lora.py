"""LoRA for pre-training: W = W0 + s·B·A with W0 random-initialised and frozen, s = α/r.

Only the adapters (and the dense embeddings, head and norms) train, so the model can never leave
the affine subspace W0 + {rank-r matrices}: the baseline ReLoRA improves on with its merges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rankscope.methods._targets import literature_rank
from rankscope.methods.base import Method, OptimDefaults, ResolvedOptim, require
from rankscope.methods.lowrank import default_targets, two_group_adamw, validate_targets_and_rank
from rankscope.models import LlamaConfig
from rankscope.nn import LoRALinear, replace_linears

# ReLoRA's (and its LoRA baseline's) α: s = 32 / r.
LORA_ALPHA = 32.0


@dataclass
class LoRASettings:
    rank: int = 128
    alpha: float = LORA_ALPHA
    targets: list[str] = field(default_factory=default_targets)


def validate_lora(settings, model_config: LlamaConfig) -> None:
    validate_targets_and_rank(settings.targets, settings.rank, model_config)
    require(settings.alpha > 0, f"method.alpha {settings.alpha} must be positive; set it to e.g. 32 (s = alpha / rank)")


def lora_parameterize(model: nn.Module, settings) -> list[LoRALinear]:
    """Wrap every targeted linear: its (random) init becomes the frozen W0, adapters start A Kaiming, B = 0."""
    layers: list[LoRALinear] = []

    def make(name: str, linear: nn.Linear) -> LoRALinear:
        layer = LoRALinear.from_linear(linear, settings.rank, settings.alpha, name=name)
        layers.append(layer)
        return layer

    replace_linears(model, make, settings.targets)
    return layers


class LoRA(Method):
    name = "lora"
    description = "LoRA pre-training: frozen random W0 plus trained s·B·A (s = alpha/r)."
    Settings = LoRASettings

    @classmethod
    def default_settings(cls, preset: str, model_config: LlamaConfig) -> LoRASettings:
        return LoRASettings(rank=literature_rank(preset, model_config))

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        # The LORO paper's LoRA baseline ran in the GaLore-era harness: AdamW lr 1e-3, wd 0,
        # clip 1.0 at every scale; the same lr trains the tiny preset.
        return OptimDefaults(lr=1e-3, weight_decay=0.0, eps=1e-8, grad_clip=1.0)

    def validate(self) -> None:
        validate_lora(self.settings, self.model_config)

    def parameterize(self, model: nn.Module) -> nn.Module:
        lora_parameterize(model, self.settings)
        return model

    def build_optimizer(self, model: nn.Module, optim: ResolvedOptim) -> torch.optim.Optimizer:
        return two_group_adamw(model, optim)
