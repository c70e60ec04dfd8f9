"""Helpers shared by the optimizer-based methods (GaLore, Fira, LORO, Spectron).

- `literature_rank`: the rank the papers used at each model scale.
- `check_targets` / `check_rank_fits`: settings checks that need only the model config, so a bad
  setting fails in `validate()`, before any model is built.
- `targeted_linears`: the modules a method acts on, with the same target semantics as
  `rankscope.nn.replace_linears` (short attribute names like "q_proj" or qualified names).
"""

from __future__ import annotations

import re

from torch import nn

from rankscope.errors import did_you_mean
from rankscope.methods.base import require
from rankscope.models import TARGET_LINEARS, LlamaConfig, iter_target_linears

# Rank per preset used by GaLore / Fira / SLTrain / LORO / CoLA at 60M..1B (r = d_model / 4 at
# 60M and 1B, 256 at 130M and 350M); 7B is GaLore's 1024. Small presets use d_model / 4.
_LITERATURE_RANK = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}

_QUALIFIED = re.compile(r"^layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")


def literature_rank(preset: str, model_config: LlamaConfig) -> int:
    return _LITERATURE_RANK.get(preset.strip().lower(), max(1, model_config.hidden_size // 4))


def short_name(target: str) -> str:
    match = _QUALIFIED.match(target)
    return match.group(3) if match else target


def check_targets(targets: list[str], model_config: LlamaConfig) -> None:
    require(len(targets) > 0, "method.targets is empty; list at least one of " + ", ".join(TARGET_LINEARS))
    for target in targets:
        short = short_name(target)
        require(
            short in TARGET_LINEARS,
            f"method.targets entry {target!r} is not a projection of the model"
            f"{did_you_mean(short, TARGET_LINEARS)}; use names like q_proj or layers.0.mlp.up_proj",
        )
        match = _QUALIFIED.match(target)
        if match:
            layer = int(match.group(1))
            require(
                layer < model_config.num_layers,
                f"method.targets entry {target!r} names layer {layer} but the model has "
                f"{model_config.num_layers} layers; fix method.targets",
            )


def linear_shape(attr: str, model_config: LlamaConfig) -> tuple[int, int]:
    """(d_out, d_in) of a target projection."""
    hidden, inter = model_config.hidden_size, model_config.intermediate_size
    if attr in ("gate_proj", "up_proj"):
        return inter, hidden
    if attr == "down_proj":
        return hidden, inter
    return hidden, hidden


def check_rank_fits(rank: int, targets: list[str], model_config: LlamaConfig, what: str = "method.rank") -> None:
    """rank must be an integer in [1, min(d_in, d_out)) for every targeted projection."""
    require(isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1,
            f"{what} = {rank!r} must be an integer >= 1; set {what} to a positive whole number")
    limit = min(min(linear_shape(short_name(t), model_config)) for t in targets)
    require(rank < limit,
            f"{what} = {rank} must be below min(d_in, d_out) = {limit} of the targeted projections "
            f"(otherwise nothing is low-rank); lower {what}")


def targeted_linears(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every targeted projection, in model order."""
    wanted = set(targets)
    return [
        (name, module)
        for name, _, attr, module in iter_target_linears(model)
        if attr in wanted or name in wanted
    ]


def plain_first_groups(model: nn.Module, targets: list[str], weight_decay_scope: str, method: str,
                       keys: dict) -> list[dict]:
    """Param groups as the APOLLO and SPAM harnesses build them: every other parameter in a plain
    group first, then the targeted weights in one group with the method's `keys`. The order
    matters where an optimizer numbers parameters (APOLLO seeds its projections with it)."""
    from rankscope.methods.base import scope_weight_decay, split_targeted

    modules = [module for _, module in targeted_linears(model, targets)]
    require(len(modules) > 0, f"{method}: method.targets matched no linear layer of the model; fix method.targets")
    targeted, rest = split_targeted(model, modules)
    groups = scope_weight_decay([{"params": rest, "name": "adamw"}], model, weight_decay_scope) if rest else []
    return groups + [{"params": targeted, "name": method, **keys}]
