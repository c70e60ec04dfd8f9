"""The common base of every parameterized linear layer, and the checks they all share."""

from __future__ import annotations

import abc

import torch
from torch import nn

from rankscope.errors import ConfigError


class ParameterizedLinear(nn.Module, abc.ABC):
    """A drop-in replacement for a bias-free ``nn.Linear(in_features, out_features)``.

    Subclasses store their own parameters (factors, frozen weights, sparse values) and implement
    ``forward``, ``effective_weight`` and ``factors``. ``effective_weight`` is differentiable;
    wrap it in ``torch.no_grad()`` when only the value is wanted.
    """

    in_features: int
    out_features: int
    rank: int

    def __init__(self, in_features: int, out_features: int, rank: int, name: str = "") -> None:
        super().__init__()
        check_rank(rank, in_features, out_features, name)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank

    @abc.abstractmethod
    def effective_weight(self) -> torch.Tensor | None:
        """The dense ``out_features x in_features`` weight this layer computes, or None."""

    @abc.abstractmethod
    def factors(self) -> dict[str, torch.Tensor]:
        """The layer's low-rank factors by name, e.g. ``{"B": B, "A": A}``."""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _layer_label(name: str) -> str:
    return name if name else "<unnamed>"


def check_rank(rank: int, in_features: int, out_features: int, name: str = "") -> None:
    """A factorization only saves anything (and only differs from dense) below min(d_in, d_out)."""
    limit = min(in_features, out_features)
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise ConfigError(
            f"rank {rank!r} must be an integer for layer {_layer_label(name)}; set method.rank to a whole number"
        )
    if rank < 1:
        raise ConfigError(
            f"rank {rank} must be at least 1 for layer {_layer_label(name)}; raise method.rank"
        )
    if rank >= limit:
        raise ConfigError(
            f"rank {rank} must be below min(d_in, d_out) = {limit} for layer {_layer_label(name)}; "
            "lower method.rank"
        )


def check_from_linear(linear: nn.Module) -> None:
    """The replacements carry no bias: the LLaMA linears they stand in for have none."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected an nn.Linear to replace, got {type(linear).__name__}")
    if linear.bias is not None:
        raise ValueError("parameterized linears have no bias; the replaced nn.Linear must use bias=False")


def seeded_init_(tensor: torch.Tensor, init_fn, generator: torch.Generator | None) -> torch.Tensor:
    """Run an in-place ``nn.init``-style ``init_fn(t, generator=...)`` on ``tensor``.

    torch's samplers need the generator on the tensor's device; when they differ (a CPU generator
    for a CUDA layer) we draw on the generator's device and copy, so a seed gives the same init
    wherever the layer lives. Without a generator torch's global RNG is used (torch.manual_seed).
    """
    with torch.no_grad():
        if generator is None or generator.device == tensor.device:
            init_fn(tensor, generator=generator)
        else:
            staging = torch.empty(tensor.shape, dtype=tensor.dtype, device=generator.device)
            init_fn(staging, generator=generator)
            tensor.copy_(staging)
    return tensor


def kaiming_uniform_a_sqrt5_(tensor: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """nn.Linear's (and LoRA's) default init: U(±1/√fan_in)."""
    def kaiming(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return nn.init.kaiming_uniform_(t, a=5**0.5, generator=generator)

    return seeded_init_(tensor, kaiming, generator)
