"""CoLA: y = B·σ(A·x), a nonlinearity inside the rank-r bottleneck."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rankscope.errors import ConfigError

from .base import ParameterizedLinear, check_from_linear, seeded_init_

COLA_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
}


def cola_init_std(in_features: int, out_features: int, rank: int) -> float:
    """CoLA's init for both factors: std = r^(-1/4)·(d_in + d_out)^(-1/4), so std_A·std_B =
    1/√(r·(d_in + d_out)) shrinks with both the bottleneck width and the layer size."""
    return rank ** -0.25 * (in_features + out_features) ** -0.25


class ColaLinear(ParameterizedLinear):
    """y = σ(x·Aᵀ)·Bᵀ with A (r x in) and B (out x r). The SiLU between the factors means there is
    no dense weight equivalent: ``effective_weight()`` is None."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        activation: str = "silu",
        *,
        name: str = "",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, rank, name)
        if activation not in COLA_ACTIVATIONS:
            raise ConfigError(
                f"unknown CoLA activation {activation!r}; set method.activation to one of {', '.join(COLA_ACTIVATIONS)}"
            )
        self.activation = activation
        self._act = COLA_ACTIVATIONS[activation]
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        std = cola_init_std(self.in_features, self.out_features, self.rank)
        normal = lambda t, generator: nn.init.normal_(t, 0.0, std, generator=generator)  # noqa: E731
        seeded_init_(self.A, normal, generator)
        seeded_init_(self.B, normal, generator)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        activation: str = "silu",
        *,
        name: str = "",
        generator: torch.Generator | None = None,
    ) -> ColaLinear:
        """A fresh layer with the shape, device and dtype of ``linear`` (its values are not used)."""
        check_from_linear(linear)
        return cls(
            linear.in_features,
            linear.out_features,
            rank,
            activation,
            name=name,
            generator=generator,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._act(F.linear(x, self.A)), self.B)

    def effective_weight(self) -> None:
        return None

    def factors(self) -> dict[str, torch.Tensor]:
        return {"B": self.B, "A": self.A}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"
