"""W = W0 + s·B·A with W0 frozen (LoRA for pre-training, ReLoRA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankscope.errors import ConfigError

from .base import ParameterizedLinear, check_from_linear, kaiming_uniform_a_sqrt5_, seeded_init_

# How A starts: "kaiming" (nn.Linear's U(±1/√d_in), B = 0) or "zero" (A = B = 0: ReLoRA's official
# wrapper zeroes A so the wrapped model equals the original, which also leaves A and B without a
# gradient until the first merge re-draws A).
LORA_INITIAL_A = ("kaiming", "zero")


def check_alpha(alpha: float, name: str = "") -> None:
    if not alpha > 0:
        raise ConfigError(
            f"alpha {alpha} must be positive for layer {name or '<unnamed>'}; set method.alpha to e.g. 32"
        )


class LoRALinear(ParameterizedLinear):
    """y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ with ``weight`` frozen, A (r x in) and B (out x r) trainable.

    s = α/r, or with ``trainable_scaling`` s = tanh(c) for a trained scalar c that starts at 1
    (ReLoRA's and SLTrain's option). ``dropout`` acts on the adapter's input only, in training
    mode (ReLoRA's lora_dropout). B starts at zero, so at init (and right after every merge) the
    layer computes exactly its frozen weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float = 32.0,
        *,
        dropout: float = 0.0,
        initial_a: str = "kaiming",
        trainable_scaling: bool = False,
        init_std: float = 0.02,
        name: str = "",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, rank, name)
        check_alpha(alpha, name)
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout {dropout} must be in [0, 1) for layer {name or '<unnamed>'}; set method.dropout")
        if initial_a not in LORA_INITIAL_A:
            raise ConfigError(f"unknown initial A {initial_a!r}; set method.initial_a to one of {', '.join(LORA_INITIAL_A)}")
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # A parameter (not a buffer) so it sits in state dicts and named_parameters like a normal
        # weight, but frozen: only the adapter trains.
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype), requires_grad=False
        )
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.scaling = (
            nn.Parameter(torch.ones(1, device=device, dtype=dtype)) if trainable_scaling else None
        )

        def normal(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
            return nn.init.normal_(t, 0.0, init_std, generator=generator)

        seeded_init_(self.weight, normal, generator)
        if initial_a == "kaiming":
            kaiming_uniform_a_sqrt5_(self.A, generator)
        with torch.no_grad():
            if initial_a == "zero":
                self.A.zero_()
            self.B.zero_()

    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """A re-drawn Kaiming-uniform, B = 0 and a trainable scale c = 0, as ReLoRA's merge does."""
        kaiming_uniform_a_sqrt5_(self.A, generator)
        with torch.no_grad():
            self.B.zero_()
            if self.scaling is not None:
                self.scaling.zero_()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        alpha: float = 32.0,
        *,
        dropout: float = 0.0,
        initial_a: str = "kaiming",
        trainable_scaling: bool = False,
        name: str = "",
        generator: torch.Generator | None = None,
    ) -> LoRALinear:
        """Wrap ``linear``: its weight is copied into the frozen ``weight``; A and B are fresh."""
        check_from_linear(linear)
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank,
            alpha,
            dropout=dropout,
            initial_a=initial_a,
            trainable_scaling=trainable_scaling,
            name=name,
            generator=generator,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
        return layer

    def adapter_scale(self) -> torch.Tensor | float:
        return self.scaling.tanh() if self.scaling is not None else self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter = F.linear(F.linear(self.dropout(x), self.A), self.B)
        return F.linear(x, self.weight) + adapter * self.adapter_scale()

    def effective_weight(self) -> torch.Tensor:
        # Sum in at least fp32: a bf16 W0 then takes a single rounding, at the very end.
        compute = torch.promote_types(self.weight.dtype, torch.float32)
        scale = self.adapter_scale()
        if torch.is_tensor(scale):
            scale = scale.to(compute)
        merged = self.weight.to(compute) + scale * (self.B.to(compute) @ self.A.to(compute))
        return merged.to(self.weight.dtype)

    def factors(self) -> dict[str, torch.Tensor]:
        return {"B": self.B, "A": self.A}

    @torch.no_grad()
    def merge_and_reinit(self, generator: torch.Generator | None = None) -> None:
        """W0 += s·B·A (summed in fp32 so a bf16 W0 loses only the final rounding), then restart
        the adapter: A Kaiming-uniform, B = 0, and a trainable scale c = 0 (ReLoRA's merge zeroes
        it, so tanh(c) = 0 and, with B = 0, the adapter gets no gradient afterwards: the official
        behaviour, kept). The layer's function is unchanged by the merge. Resetting the optimizer
        state of A and B is the caller's job (it owns the optimizer)."""
        self.weight.copy_(self.effective_weight())
        self.reset_adapter(generator)

    def extra_repr(self) -> str:
        scaling = "trainable" if self.scaling is not None else f"{self.scale:g}"
        return f"{super().extra_repr()}, scale={scaling}"
