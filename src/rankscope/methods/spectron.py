"""Spectron: native low-rank W = B·A with orthogonalized, spectrally renormalized factor steps.

The targeted linears become `LowRankLinear`; every factor pair [B, A] goes into one `Spectron`
group (momentum, Newton–Schulz orthogonalization, step rho = lr / (sigma_A + sigma_B + 1), so the
change of B·A stays about lr in spectral norm). Embeddings, norms and the head use AdamW.
The paper's tuned values are not public, so the default lr comes from our own sweep (below).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rankscope.methods._targets import literature_rank
from rankscope.methods.base import OptimDefaults, require
from rankscope.methods.loro import NativeLowRankMethod
from rankscope.models import TARGET_LINEARS
from rankscope.optim import Spectron as SpectronOptimizer


@dataclass
class SpectronSettings:
    rank: int = 128
    momentum: float = 0.9
    ns_steps: int = 5
    init: str = "xavier"
    targets: list[str] = field(default_factory=lambda: list(TARGET_LINEARS))


# Default lr from our sweep (the paper's tuned values are not public). Tiny preset cut to 2
# layers, rank 32, seq 32, batch 8, 100 steps (10% warmup, cosine to 0.1), seed 0, embedded
# corpus, one lr shared by the factor group and the AdamW groups; final val ppl (initial 8492):
#   lr 1e-3: 1050.0   3e-3: 962.9   1e-2: 855.1   3e-2: 716.2   1e-1: 688.7
# 1e-1 is marginally better over 100 steps, but it also drives AdamW on the embeddings at 0.1 and
# short sweeps favour large rates; 3e-2 keeps most of the gain with a safety margin.
SPECTRON_LR = 3e-2


class Spectron(NativeLowRankMethod):
    name = "spectron"
    description = "Spectron: W = B·A, momentum + Newton-Schulz orthogonalized factor steps scaled by 1/(sigma_A+sigma_B+1)."
    Settings = SpectronSettings
    optimizer_class = SpectronOptimizer

    @classmethod
    def default_settings(cls, preset: str, model_config: Any) -> SpectronSettings:
        return SpectronSettings(rank=literature_rank(preset, model_config))

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        return OptimDefaults(lr=SPECTRON_LR, weight_decay=0.0, eps=1e-8, grad_clip=1.0)

    def validate(self) -> None:
        super().validate()
        s = self.settings
        require(isinstance(s.momentum, (int, float)) and 0.0 <= s.momentum < 1.0,
                f"method.momentum = {s.momentum!r} must be in [0, 1) (Spectron's beta, 0.9 by default)")
        require(isinstance(s.ns_steps, int) and s.ns_steps >= 1,
                f"method.ns_steps = {s.ns_steps!r} must be an integer >= 1 (Newton-Schulz iterations)")

    def factor_group_keys(self) -> dict[str, Any]:
        return {"momentum": float(self.settings.momentum), "ns_steps": self.settings.ns_steps}
