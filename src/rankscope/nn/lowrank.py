"""W = B·A trained natively (vanilla low-rank, LORO, Spectron)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankscope.errors import ConfigError

from .base import ParameterizedLinear, check_from_linear, seeded_init_

# How the factors start:
#   xavier_normal   each factor N(0, 2 / (fan_in + fan_out)): LORO-main's LowRankLinear ("xavier").
#   xavier_uniform  each factor U(±√(6 / (fan_in + fan_out))): the same variance, uniform.
#   xavier          rankscope's earlier name for xavier_uniform (kept so older run configs load).
#   dense_svd       the balanced rank-r truncated SVD of the dense layer's own init,
#                   B = U_r·√Σ_r, A = √Σ_r·V_rᵀ: NVIDIA Spectron's _initialize_state.
LOWRANK_INITS = ("xavier_normal", "xavier_uniform", "xavier", "dense_svd")


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
        init: str = "xavier_uniform",
        *,
        dense_weight: torch.Tensor | None = None,
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
        if init == "dense_svd":
            if dense_weight is None:
                raise ConfigError("the dense_svd init factorizes a dense weight; build the layer with "
                                  "LowRankLinear.from_linear(linear, rank, 'dense_svd')")
            if not self.B.is_meta:  # a meta layer has no values: a checkpoint will fill it
                self.init_from_dense(dense_weight)
        else:
            self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Xavier init of both factors (B first), normal or uniform per `init`."""
        draw = nn.init.xavier_normal_ if self.init == "xavier_normal" else nn.init.xavier_uniform_
        seeded_init_(self.B, draw, generator)
        seeded_init_(self.A, draw, generator)

    @torch.no_grad()
    def init_from_dense(self, weight: torch.Tensor) -> None:
        """B = U_r·√Σ_r, A = √Σ_r·V_rᵀ from the SVD of `weight` (computed in fp32 or wider)."""
        compute = torch.promote_types(weight.dtype, torch.float32)
        u, sigma, vh = torch.linalg.svd(weight.to(compute), full_matrices=False)
        root = sigma[: self.rank].sqrt()
        self.B.copy_(u[:, : self.rank] * root)
        self.A.copy_(root.unsqueeze(1) * vh[: self.rank])

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        init: str = "xavier_uniform",
        *,
        name: str = "",
        generator: torch.Generator | None = None,
    ) -> LowRankLinear:
        """A fresh layer with the shape, device and dtype of ``linear``; its values are used only by
        the dense_svd init."""
        check_from_linear(linear)
        return cls(
            linear.in_features,
            linear.out_features,
            rank,
            init,
            dense_weight=linear.weight.detach() if init == "dense_svd" else None,
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
