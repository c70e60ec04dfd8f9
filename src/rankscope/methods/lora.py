"""LoRA for pre-training: W = W0 + s·B·A with W0 random-initialised and frozen, s = α/r.

Only the adapters (and the dense embeddings, head and norms) train, so the model can never leave
the affine subspace W0 + {rank-r matrices}: the baseline ReLoRA improves on with its merges.
The LoRA baseline of the ReLoRA / GaLore / LORO papers ran in ReLoRA's harness without restarts
(Guitaricet/relora torchrun_main.py): α 32, adapter dropout 0.1, clipping at 1.0. That harness's
last version zeroes A at wrap time, which without merges would leave the adapters untrained; the
baseline's numbers predate it, so A starts Kaiming-uniform here (`initial_a`, see docs/methods.md).
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
from rankscope.nn.lora import LORA_INITIAL_A

# ReLoRA's (and its LoRA baseline's) α: s = 32 / r (torchrun_main --lora_alpha default).
LORA_ALPHA = 32.0
# ReLoRA's harness hard-codes lora_dropout=0.1 when it wraps the model.
LORA_DROPOUT = 0.1


@dataclass
class LoRASettings:
    rank: int = 128
    alpha: float = LORA_ALPHA
    dropout: float = LORA_DROPOUT
    initial_a: str = "kaiming"
    trainable_scaling: bool = False
    targets: list[str] = field(default_factory=default_targets)


def validate_lora(settings, model_config: LlamaConfig) -> None:
    validate_targets_and_rank(settings.targets, settings.rank, model_config)
    require(settings.alpha > 0, f"method.alpha {settings.alpha} must be positive; set it to e.g. 32 (s = alpha / rank)")
    require(isinstance(settings.dropout, (int, float)) and 0.0 <= settings.dropout < 1.0,
            f"method.dropout {settings.dropout!r} must be in [0, 1) (adapter-input dropout; 0.1 in ReLoRA's harness)")
    require(settings.initial_a in LORA_INITIAL_A,
            f"method.initial_a {settings.initial_a!r} is unknown; use one of {', '.join(LORA_INITIAL_A)}")


def lora_parameterize(model: nn.Module, settings) -> list[LoRALinear]:
    """Wrap every targeted linear: its (random) init becomes the frozen W0, B = 0, A per `initial_a`."""
    layers: list[LoRALinear] = []

    def make(name: str, linear: nn.Linear) -> LoRALinear:
        layer = LoRALinear.from_linear(
            linear, settings.rank, settings.alpha, dropout=settings.dropout, initial_a=settings.initial_a,
            trainable_scaling=settings.trainable_scaling, name=name,
        )
        layers.append(layer)
        return layer

    replace_linears(model, make, settings.targets)
    return layers


class LoRA(Method):
    name = "lora"
    color = "#56B4E9"
    description = "LoRA pre-training: frozen random W0 plus trained s·B·A (s = alpha/r), adapter dropout 0.1."
    Settings = LoRASettings

    @classmethod
    def default_settings(cls, preset: str, model_config: LlamaConfig) -> LoRASettings:
        return LoRASettings(rank=literature_rank(preset, model_config))

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        # ReLoRA's harness (torchrun_main.py @176f376): torch AdamW, lr 1e-3 in its scripts,
        # wd 0, --clip_grad_norm default 1.0. The same lr trains the tiny preset.
        return OptimDefaults(lr=1e-3, weight_decay=0.0, eps=1e-8, grad_clip=1.0)

    def validate(self) -> None:
        validate_lora(self.settings, self.model_config)

    def parameterize(self, model: nn.Module) -> nn.Module:
        lora_parameterize(model, self.settings)
        return model

    def build_optimizer(self, model: nn.Module, optim: ResolvedOptim) -> torch.optim.Optimizer:
        return two_group_adamw(model, optim)
