"""Full-rank baseline: the dense LLaMA trained with AdamW (the literature used Adam, wd 0)."""

from __future__ import annotations

from rankscope.methods.base import Method, OptimDefaults


class FullRank(Method):
    name = "full"
    color = "#222222"  # the reference every other line is read against: near-black
    description = "Dense full-rank baseline: AdamW on every weight (lr 1e-3, wd 0)."

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        # GaLore's harness (torchrun_main.py, whose full-rank numbers the LORO paper reprints):
        # torch Adam (= AdamW at wd 0), --grad_clipping default 0.0.
        return OptimDefaults(lr=1e-3, weight_decay=0.0, eps=1e-8, grad_clip=0.0)
