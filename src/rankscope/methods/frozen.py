"""The frozen-blocks control: the targeted block matrices stay at their seeded init.

Only the embeddings, the LM head and the norm gains train (at the study's shared dense lrs when
`optim.embed_lr` / `head_lr` / `norm_lr` are set, else at this control's lr). Every low-rank
method changes the block matrices and nothing else, so a regime in which this control comes
close to the best method cannot tell such methods apart: whatever separates them there is not
what they do to the blocks (../shared/evidence/short-regime.md measured the demo's old regime
0.13 nats from the best method and 0.62 nats *ahead* of tuned full rank). It is a control, not a
method: studies train it by default (`controls: [frozen]`) and the report shows it as a
reference row, never ranks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from rankscope.methods._targets import check_targets, targeted_linears
from rankscope.methods.base import Method, OptimDefaults, require
from rankscope.methods.lowrank import default_targets


@dataclass
class FrozenSettings:
    targets: list[str] = field(default_factory=default_targets)


class FrozenBlocks(Method):
    name = "frozen"
    description = ("Control: the targeted block matrices frozen at their seeded init; only embeddings, head "
                   "and norms train. Not a method: shows whether a regime can separate methods at all.")
    Settings = FrozenSettings
    is_control = True
    color = "#8A8A8A"  # the control: grey (and dashed in the figures)

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        # Full rank's harness values: what the trained parts get when no dense lr is shared.
        return OptimDefaults(lr=1e-3, weight_decay=0.0, eps=1e-8, grad_clip=0.0)

    def validate(self) -> None:
        check_targets(self.settings.targets, self.model_config)
        require(len(set(self.settings.targets)) == len(self.settings.targets),
                f"method.targets lists a projection twice: {self.settings.targets}; list each once")

    def parameterize(self, model: nn.Module) -> nn.Module:
        modules = targeted_linears(model, self.settings.targets)
        require(len(modules) > 0, f"{self.name}: method.targets matched no linear layer of the model; fix method.targets")
        for _, module in modules:
            for p in module.parameters():
                p.requires_grad_(False)
        return model
