"""SLTrain: W = s·B·A + S, S sparse on a fixed uniformly random support, s = α/r.

The support (δ·d_out·d_in positions) is drawn from torch's global RNG at parameterize time (the
trainer seeds it first, so a seed fixes the support) and lives in each layer's persistent
`sparse_index` buffer: checkpoints carry it and `load_state_dict` restores it. Only the factors
and the sparse values are parameters; the dense W is formed transiently inside one layer's
forward/backward (rankscope.nn.SparsePlusLowRankLinear), never kept as a parameter or state.
`refactor_every` adds Glentis et al.'s weight refactorization with momentum reset
(methods/refactor.py; the official code runs it on SLTrain).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rankscope.methods._targets import linear_shape, literature_rank
from rankscope.methods.base import Method, OptimDefaults, ResolvedOptim, require
from rankscope.methods.lowrank import default_targets, two_group_adamw, validate_targets_and_rank
from rankscope.methods.refactor import Refactoring, RefactorSettings
from rankscope.models import LlamaConfig
from rankscope.nn import SparsePlusLowRankLinear, replace_linears
from rankscope.nn.sparse import support_size

# SLTrain's α and sparsity per scale (andyjm3/SLTrain scripts/llm_pretrain/sltrain*.sh:
# --lora_alpha 32/16/16/8/8, --sp_ratio 0.03 up to 1B and 0.05 at 7B). Smaller presets use the
# 60M values.
SLTRAIN_ALPHA = {"60m": 32.0, "130m": 16.0, "350m": 16.0, "1b": 8.0, "7b": 8.0}
SLTRAIN_DENSITY = 0.03
SLTRAIN_DENSITY_BY_PRESET = {"7b": 0.05}


@dataclass
class SLTrainSettings(RefactorSettings):
    rank: int = 128
    alpha: float = 32.0
    density: float = SLTRAIN_DENSITY
    # s = tanh(c) with a trained scalar c starting at 1 instead of α/r (SLTrain's --train_scaling).
    trainable_scaling: bool = False
    targets: list[str] = field(default_factory=default_targets)


class SLTrain(Refactoring, Method):
    name = "sltrain"
    color = "#CC79A7"
    description = "SLTrain: s·B·A plus a sparse S on a fixed random support (3%), trained without a dense W."
    Settings = SLTrainSettings

    @classmethod
    def default_settings(cls, preset: str, model_config: LlamaConfig) -> SLTrainSettings:
        return SLTrainSettings(
            rank=literature_rank(preset, model_config),
            alpha=SLTRAIN_ALPHA.get(preset, 32.0),
            density=SLTRAIN_DENSITY_BY_PRESET.get(preset, SLTRAIN_DENSITY),
        )

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        # SLTrain's harness (torchrun_main.py + scripts): torch AdamW lr 3e-3 at every scale, wd 0,
        # --grad_clipping default 0.0 (only the 7B script clips, at 1.0); 3e-3 trains tiny too.
        return OptimDefaults(lr=3e-3, weight_decay=0.0, eps=1e-8, grad_clip=1.0 if preset == "7b" else 0.0)

    def validate(self) -> None:
        s = self.settings
        validate_targets_and_rank(s.targets, s.rank, self.model_config)
        self.validate_refactoring()
        require(s.alpha > 0, f"method.alpha {s.alpha} must be positive; set it to e.g. 32 (s = alpha / rank)")
        require(
            0.0 < s.density < 1.0,
            f"method.density {s.density} must be in (0, 1) (the fraction of sparse entries); e.g. 0.03",
        )
        for target in s.targets:
            d_out, d_in = linear_shape(target.rsplit(".", 1)[-1], self.model_config)  # "q_proj" or "layers.0.mlp.q_proj"
            require(
                support_size(s.density, d_in, d_out) >= 1,
                f"method.density {s.density} gives no sparse entry in the {d_out}x{d_in} {target}; raise method.density",
            )

    def parameterize(self, model: nn.Module) -> nn.Module:
        s = self.settings
        replace_linears(
            model,
            # generator=None: supports and values come from the seeded global RNG.
            lambda name, linear: SparsePlusLowRankLinear.from_linear(
                linear, s.rank, s.alpha, s.density, trainable_scaling=s.trainable_scaling, name=name
            ),
            s.targets,
        )
        return model

    def build_optimizer(self, model: nn.Module, optim: ResolvedOptim) -> torch.optim.Optimizer:
        self.remember_total_steps(optim)
        return two_group_adamw(model, optim)
