"""W = W0 + s·B·A with W0 frozen (LoRA for pre-training, ReLoRA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankscope.errors import ConfigError

from .base import ParameterizedLinear, check_from_linear, kaiming_uniform_a_sqrt5_, seeded_init_


def check_alpha(alpha: float, name: str = "") -> None:
    if not alpha > 0:
        raise ConfigError(
            f"alpha {alpha} must be positive for layer {name or '<unnamed>'}; set method.alpha to e.g. 32"
        )


class LoRALinear(ParameterizedLinear):
    """y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ with ``weight`` frozen, A (r x in) and B (out x r) trainable, s = α/r.

    A starts Kaiming-uniform and B at zero, so at init (and right after every merge) the layer
    computes exactly its frozen weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float = 32.0,
        *,
        init_std: float = 0.02,
        name: str = "",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, rank, name)
        check_alpha(alpha, name)
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        # A parameter (not a buffer) so it sits in state dicts and named_parameters like a normal
        # weight, but frozen: only the adapter trains.
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype), requires_grad=False
        )
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        def normal(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
            return nn.init.normal_(t, 0.0, init_std, generator=generator)

        seeded_init_(self.weight, normal, generator)
        self.reset_adapter(generator)

    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        kaiming_uniform_a_sqrt5_(self.A, generator)
        with torch.no_grad():
            self.B.zero_()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        alpha: float = 32.0,
        *,
        name: str = "",
        generator: torch.Generator | None = None,
    ) -> "LoRALinear":
        """Wrap ``linear``: its weight is copied into the frozen ``weight``; A and B are fresh."""
        check_from_linear(linear)
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank,
            alpha,
            name=name,
            generator=generator,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.scale * F.linear(F.linear(x, self.A), self.B)

    def effective_weight(self) -> torch.Tensor:
        # Sum in at least fp32: a bf16 W0 then takes a single rounding, at the very end.
        compute = torch.promote_types(self.weight.dtype, torch.float32)
        merged = self.weight.to(compute) + self.scale * (self.B.to(compute) @ self.A.to(compute))
        return merged.to(self.weight.dtype)

    def factors(self) -> dict[str, torch.Tensor]:
        return {"B": self.B, "A": self.A}

    @torch.no_grad()
    def merge_and_reinit(self, generator: torch.Generator | None = None) -> None:
        """W0 += s·B·A (summed in fp32 so a bf16 W0 loses only the final rounding), then restart
        the adapter: A Kaiming-uniform, B = 0. The layer's function is unchanged by the merge.
        Resetting the optimizer state of A and B is the caller's job (it owns the optimizer)."""
        self.weight.copy_(self.effective_weight())
        self.reset_adapter(generator)
