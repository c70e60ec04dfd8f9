"""W = B·A trained natively (vanilla low-rank, LORO, Spectron)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankscope.errors import ConfigError

from .base import ParameterizedLinear, check_from_linear, seeded_init_

LOWRANK_INITS = ("xavier",)


class LowRankLinear(ParameterizedLinear):
    """y = (x·Aᵀ)·Bᵀ with B (out x r) and A (r x in), both trainable.

    The forward goes through the rank-r bottleneck, so it costs r·(in + out) per token and never
    builds the dense out x in weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        init: str = "xavier",
        *,
        name: str = "",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, rank, name)
        if init not in LOWRANK_INITS:
            raise ConfigError(f"unknown low-rank init {init!r}; use one of {', '.join(LOWRANK_INITS)}")
        self.init = init
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # Xavier-uniform on each factor, as the LORO paper's low-rank baseline and LORO itself.
        seeded_init_(self.B, nn.init.xavier_uniform_, generator)
        seeded_init_(self.A, nn.init.xavier_uniform_, generator)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        init: str = "xavier",
        *,
        name: str = "",
        generator: torch.Generator | None = None,
    ) -> "LowRankLinear":
        """A fresh layer with the shape, device and dtype of ``linear`` (its values are not used)."""
        check_from_linear(linear)
        return cls(
            linear.in_features,
            linear.out_features,
            rank,
            init,
            name=name,
            generator=generator,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B)

    def effective_weight(self) -> torch.Tensor:
        return self.B @ self.A

    def factors(self) -> dict[str, torch.Tensor]:
        return {"B": self.B, "A": self.A}
