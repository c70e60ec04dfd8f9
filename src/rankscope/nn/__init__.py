"""Reusable parameterized linear layers, and the helper that swaps them into a model."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from rankscope.errors import ConfigError, did_you_mean
from rankscope.models.dense import NotDenseError, dense_state_dict

from .base import ParameterizedLinear, check_rank
from .cola import ColaLinear, cola_init_std
from .lora import LoRALinear
from .lowrank import LowRankLinear
from .sparse import SparsePlusLowRankLinear
from .switchlora import SwitchLoRALinear

__all__ = [
    "ColaLinear",
    "LoRALinear",
    "LowRankLinear",
    "NotDenseError",
    "ParameterizedLinear",
    "SparsePlusLowRankLinear",
    "SwitchLoRALinear",
    "check_rank",
    "cola_init_std",
    "dense_state_dict",
    "replace_linears",
]

LinearFactory = Callable[[str, nn.Linear], nn.Module]


def replace_linears(
    model: nn.Module, factory: LinearFactory, targets: Iterable[str] | None = None
) -> list[str]:
    """Replace the model's targeted linears in place by ``factory(qualified_name, linear)``.

    ``targets`` narrows the model's target linears (``rankscope.models.iter_target_linears``) to
    those whose attribute name (``"q_proj"``) or qualified name (``"layers.0.mlp.up_proj"``) is
    listed; None keeps them all. Returns the qualified names replaced, in model order.
    """
    # Imported here, not at module top, so rankscope.models may itself import rankscope.nn.
    from rankscope.models import iter_target_linears

    # Collect first: swapping modules while named_modules() walks the tree would confuse the walk.
    candidates = list(iter_target_linears(model))
    wanted = None if targets is None else list(targets)
    if wanted is not None:
        available = {attr for _, _, attr, _ in candidates} | {name for name, _, _, _ in candidates}
        for target in wanted:
            if target not in available:
                short_names = {attr for _, _, attr, _ in candidates}
                raise ConfigError(
                    f"target {target!r} matches no linear layer of the model{did_you_mean(target, short_names)}; "
                    "fix method.targets"
                )
        chosen = [c for c in candidates if c[2] in wanted or c[0] in wanted]
    else:
        chosen = candidates

    replaced: list[str] = []
    for name, parent, attr, linear in chosen:
        if not isinstance(linear, nn.Linear):
            # iter_target_linears yields whatever sits there now; parameterizing twice is a bug.
            raise TypeError(f"{name} is already a {type(linear).__name__}; parameterize a model with plain linears")
        new_module = factory(name, linear)
        if not isinstance(new_module, nn.Module):
            raise TypeError(f"factory returned {type(new_module).__name__} for {name}, expected an nn.Module")
        setattr(parent, attr, new_module)
        replaced.append(name)
    return replaced
