"""CoLA: every targeted linear becomes y = B·σ(A·x), a nonlinearity inside the rank-r bottleneck.

There is no dense equivalent (`effective_weight()` is None). The MLP keeps all three projections,
each a CoLA bottleneck, and computes down(act(gate(x)) · up(x)). The official ColaMLP applies the
outer SiLU on the gate only when `only_lr_act` is false: the 60M and 130M configs say so, the
350M / 1B / 7B configs leave the class default (true), so from 350M up the MLP is
down(gate(x) · up(x)): still gated, but its only activations are the σ inside the bottlenecks.
`outer_activation` is that switch (= not only_lr_act), defaulting per preset as the configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rankscope.methods._targets import literature_rank
from rankscope.methods.base import Method, OptimDefaults, ResolvedOptim, require
from rankscope.methods.lowrank import default_targets, two_group_adamw, validate_targets_and_rank
from rankscope.models import LlamaConfig
from rankscope.nn import ColaLinear, replace_linears
from rankscope.nn.cola import COLA_ACTIVATIONS

# CoLA's lr per scale (official scripts: 6e-3 / 3e-3 / 3e-3 / 2e-3 at 60M / 130M / 350M / 1B);
# tiny and 20m use the 60M value, 7B keeps the 1B value.
COLA_LR = {"130m": 3e-3, "350m": 3e-3, "1b": 2e-3, "7b": 2e-3}
# Presets whose official config keeps only_lr_act at its default (true): no outer activation.
NO_OUTER_ACTIVATION_PRESETS = ("350m", "1b", "7b")


class ColaMLP(nn.Module):
    """The MLP of CoLA's models: down(act(gate(x)) · up(x)), act = SiLU or, with
    `outer_activation=False` (official only_lr_act), the identity.

    Keeps the `gate_proj` / `up_proj` / `down_proj` names, so checkpoints read like LLaMA's."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, outer_activation: bool) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.outer_activation = outer_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        if self.outer_activation:
            gate = F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))

    def extra_repr(self) -> str:
        return f"outer_activation={self.outer_activation}"


@dataclass
class CoLASettings:
    rank: int = 128
    activation: str = "silu"
    outer_activation: bool = True
    targets: list[str] = field(default_factory=default_targets)


class CoLA(Method):
    name = "cola"
    color = "#D55E00"
    description = "CoLA: y = B·silu(A·x) in every targeted linear (no dense form); AdamW wd 0.01, clip 0.5."
    Settings = CoLASettings

    @classmethod
    def default_settings(cls, preset: str, model_config: LlamaConfig) -> CoLASettings:
        return CoLASettings(
            rank=literature_rank(preset, model_config), outer_activation=preset not in NO_OUTER_ACTIVATION_PRESETS
        )

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        # CoLA's scripts: torch AdamW over every trainable parameter, wd 0.01, grad clip 0.5, lr by
        # scale (COLA_LR), eps torch's 1e-8.
        return OptimDefaults(lr=COLA_LR.get(preset, 6e-3), weight_decay=0.01, eps=1e-8, grad_clip=0.5)

    def validate(self) -> None:
        s = self.settings
        validate_targets_and_rank(s.targets, s.rank, self.model_config)
        require(
            s.activation in COLA_ACTIVATIONS,
            f"method.activation {s.activation!r} is unknown; use one of {', '.join(COLA_ACTIVATIONS)}",
        )
        if not s.outer_activation:
            # Without the outer SiLU the bottleneck σ inside the MLP projections is the MLP's only
            # nonlinearity: all three must be CoLA layers, in every block (the short names).
            require(
                all(t in s.targets for t in ("gate_proj", "up_proj", "down_proj")),
                "method.outer_activation=false needs gate_proj, up_proj and down_proj in method.targets (their "
                "bottleneck activation is then the MLP's only nonlinearity); add them or set method.outer_activation=true",
            )

    def parameterize(self, model: nn.Module) -> nn.Module:
        s = self.settings
        replace_linears(
            model, lambda name, linear: ColaLinear.from_linear(linear, s.rank, s.activation, name=name), s.targets
        )
        for block in model.layers:
            mlp = block.mlp
            block.mlp = ColaMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, s.outer_activation)
        return model

    def build_optimizer(self, model: nn.Module, optim: ResolvedOptim) -> torch.optim.Optimizer:
        return two_group_adamw(model, optim)
