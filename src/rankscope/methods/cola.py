"""CoLA: every targeted linear becomes y = B·σ(A·x), a nonlinearity inside the rank-r bottleneck.

There is no dense equivalent (`effective_weight()` is None). The MLP keeps its outer SwiGLU gate
at 60M/130M; the official 350M+ configs drop it, which `mlp_gate: false` reproduces by swapping
each block's MLP for `UngatedColaMLP`: down(up(x)) whose only nonlinearities are the σ inside
the two CoLA bottlenecks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rankscope.methods._targets import literature_rank
from rankscope.methods.base import Method, OptimDefaults, ResolvedOptim, require
from rankscope.methods.lowrank import default_targets, two_group_adamw, validate_targets_and_rank
from rankscope.models import LlamaConfig
from rankscope.nn import ColaLinear, replace_linears
from rankscope.nn.cola import COLA_ACTIVATIONS

# CoLA's lr per scale (official configs: 6e-3 / 3e-3 / 3e-3 / 2e-3 at 60M / 130M / 350M / 1B);
# tiny and 20m use the 60M value, 7B keeps the 1B value.
COLA_LR = {"130m": 3e-3, "350m": 3e-3, "1b": 2e-3, "7b": 2e-3}
# Presets whose official config drops the MLP gate (350M and up).
UNGATED_PRESETS = ("350m", "1b", "7b")


class UngatedColaMLP(nn.Module):
    """The MLP of CoLA's 350M+ configs: down_proj(up_proj(x)) without the SiLU gate.

    Keeps the `up_proj` / `down_proj` names so checkpoints read like the gated model's, minus
    `gate_proj`."""

    def __init__(self, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.up_proj = up_proj
        self.down_proj = down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.up_proj(x))


@dataclass
class CoLASettings:
    rank: int = 128
    activation: str = "silu"
    mlp_gate: bool = True
    targets: list[str] = field(default_factory=default_targets)


class CoLA(Method):
    name = "cola"
    description = "CoLA: y = B·silu(A·x) in every targeted linear (no dense form); AdamW wd 0.01, clip 0.5."
    Settings = CoLASettings

    @classmethod
    def default_settings(cls, preset: str, model_config: LlamaConfig) -> CoLASettings:
        return CoLASettings(rank=literature_rank(preset, model_config), mlp_gate=preset not in UNGATED_PRESETS)

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        # CoLA's official configs: AdamW wd 0.01, grad clip 0.5, lr by scale (COLA_LR).
        return OptimDefaults(lr=COLA_LR.get(preset, 6e-3), weight_decay=0.01, eps=1e-8, grad_clip=0.5)

    def validate(self) -> None:
        s = self.settings
        validate_targets_and_rank(s.targets, s.rank, self.model_config)
        require(
            s.activation in COLA_ACTIVATIONS,
            f"method.activation {s.activation!r} is unknown; use one of {', '.join(COLA_ACTIVATIONS)}",
        )
        if not s.mlp_gate:
            # Without the gate the bottleneck σ is the MLP's only nonlinearity: both halves of
            # every block need it (the short names, which target every block).
            require(
                "up_proj" in s.targets and "down_proj" in s.targets,
                "method.mlp_gate=false needs up_proj and down_proj in method.targets (their bottleneck "
                "SiLU is the MLP's only nonlinearity); add them or set method.mlp_gate=true",
            )

    def parameterize(self, model: nn.Module) -> nn.Module:
        s = self.settings
        # No layer for a gate that is about to be dropped.
        targets = [t for t in s.targets if s.mlp_gate or not t.endswith("gate_proj")]
        replace_linears(
            model, lambda name, linear: ColaLinear.from_linear(linear, s.rank, s.activation, name=name), targets
        )
        if not s.mlp_gate:
            for block in model.layers:
                block.mlp = UngatedColaMLP(block.mlp.up_proj, block.mlp.down_proj)
        return model

    def build_optimizer(self, model: nn.Module, optim: ResolvedOptim) -> torch.optim.Optimizer:
        return two_group_adamw(model, optim)
