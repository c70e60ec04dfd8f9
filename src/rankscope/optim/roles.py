"""Per-role learning rates and weight decay: the parameters that are not the method's.

A low-rank method changes how the block matrices (q, k, v, o, gate, up, down) are parameterized
and stepped. The token embeddings, the LM head and the norm gains are not its business, yet every
official harness (GaLore, Fira, LORO, CoLA, Glentis et al.) steps them with the method's one lr,
so a method whose lr is 20x full rank's also trains its embeddings 20x faster
(../shared/evidence/short-regime.md). `optim.embed_lr`, `head_lr`, `norm_lr` and the matching
`*_weight_decay` settings fix them for every method alike.

The settings act after the method has built its optimizer, here and nowhere else: each role's
parameters move out of the plain (AdamW) group that holds them into a copy of that group with the
role's values, so they are stepped by the same code as before. A role's parameters inside a group
with method keys (a projection, factor pairs) cannot be moved without changing what the method
does; that is an error naming the method and the group. Unset roles leave the optimizer as the
method built it, so every config without these settings reproduces bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankscope.errors import ConfigError

ROLES = ("embed", "head", "norm")
ROLE_LABELS = {"embed": "embeddings", "head": "LM head", "norm": "norm gains", "blocks": "everything else"}
ROLE_FIELDS = tuple(f"{role}_{kind}" for role in ROLES for kind in ("lr", "weight_decay"))
# Keys every group carries that are not a method's: the trainer's and rankscope's bookkeeping.
_BOOKKEEPING_KEYS = {"params", "name", "base_lr", "initial_lr"}


def parameter_roles(model: nn.Module) -> dict[int, str]:
    """{id(parameter): role} for the embeddings (every nn.Embedding), the LM head (the module named
    lm_head) and the norm gains (every module whose class name ends in "Norm")."""
    roles: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            role = "embed"
        elif name.rsplit(".", 1)[-1] == "lm_head":
            role = "head"
        elif type(module).__name__.endswith("Norm"):
            role = "norm"
        else:
            continue
        for p in module.parameters(recurse=False):
            if roles.get(id(p), role) != role:  # tied input and output embeddings
                raise ConfigError("the model ties its LM head to its embeddings, so optim.head_lr / "
                                  "head_weight_decay cannot differ from the embeddings'; set only the embed_ values")
            roles[id(p)] = role
    return roles


def role_settings(optim: Any) -> dict[str, dict[str, float]]:
    """{role: {"lr": x, "weight_decay": y}} with the values `optim` (a config section or resolved
    settings with `<role>_lr` / `<role>_weight_decay` attributes) sets, unset keys left out."""
    out: dict[str, dict[str, float]] = {}
    for role in ROLES:
        values = {kind: getattr(optim, f"{role}_{kind}", None) for kind in ("lr", "weight_decay")}
        values = {k: float(v) for k, v in values.items() if v is not None}
        for kind, value in values.items():
            if not value >= 0.0 or value != value or value == float("inf"):
                raise ConfigError(f"optim.{role}_{kind} = {value!r} must be a finite number >= 0")
        if values:
            out[role] = values
    return out


def is_plain_group(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """A group the optimizer steps as plain AdamW: no keys beyond its defaults (a projected group
    has `rank`, a factor group `factor_pairs`, ...)."""
    return set(group) <= set(optimizer.defaults) | _BOOKKEEPING_KEYS


def apply_role_settings(model: nn.Module, optimizer: torch.optim.Optimizer, roles: dict[str, dict[str, float]],
                        method: str = "the method") -> None:
    """Move each role's parameters into a copy of their plain group with the role's values.

    Must run before the first step (the moved parameters have no state yet) and before the trainer
    records each group's base lr.
    """
    if not roles:
        return
    role_of = parameter_roles(model)
    names = {id(p): n for n, p in model.named_parameters()}
    kept_groups: list[dict[str, Any]] = []
    new_groups: list[dict[str, Any]] = []
    for group in optimizer.param_groups:
        moving: dict[str, list[nn.Parameter]] = {}
        staying = []
        for p in group["params"]:
            role = role_of.get(id(p))
            if role in roles:
                moving.setdefault(role, []).append(p)
            else:
                staying.append(p)
        if moving and not is_plain_group(optimizer, group):
            first = moving[next(iter(moving))][0]
            extra = sorted(set(group) - set(optimizer.defaults) - _BOOKKEEPING_KEYS)
            raise ConfigError(
                f"{method} steps {names.get(id(first), 'a parameter')} in its group {group.get('name')!r} with "
                f"method keys {extra}, so optim.{next(iter(moving))}_lr / _weight_decay cannot apply to it; "
                "unset those optim settings for this method")
        if any(optimizer.state.get(p) for ps in moving.values() for p in ps):
            raise RuntimeError("apply_role_settings must run before the optimizer's first step")
        settings = {k: v for k, v in group.items() if k != "params"}
        for role, params in moving.items():
            new_groups.append({**settings, **roles[role], "params": params,
                               "name": f"{group.get('name', 'group')}_{role}"})
        if staying:
            group["params"] = staying
            kept_groups.append(group)
    optimizer.param_groups[:] = kept_groups
    for group in new_groups:
        optimizer.add_param_group(group)


def group_record(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's name, base lr, weight decay, size and the roles of its parameters: what
    the checkpoint, metrics.jsonl and summary.json record as the run's effective settings."""
    role_of = parameter_roles(model)
    rows = []
    for group in optimizer.param_groups:
        roles = sorted({role_of.get(id(p), "blocks") for p in group["params"]})
        rows.append({"name": group.get("name", "group"), "lr": float(group.get("base_lr", group["lr"])),
                     "weight_decay": float(group.get("weight_decay", 0.0)), "plain": is_plain_group(optimizer, group),
                     "roles": roles, "tensors": len(group["params"]),
                     "elements": int(sum(p.numel() for p in group["params"]))})
    return rows


def effective_roles(optim: Any, scope_exempts_norms: bool) -> dict[str, dict[str, float]]:
    """Each role's lr and weight decay as a run with resolved settings `optim` applies them (the
    method's lr for everything else, "blocks", whose step the method may still scale)."""
    own = optim.roles
    out = {"blocks": {"lr": float(optim.lr), "weight_decay": float(optim.weight_decay)}}
    for role in ROLES:
        default_wd = 0.0 if (role == "norm" and scope_exempts_norms) else float(optim.weight_decay)
        out[role] = {"lr": float(own.get(role, {}).get("lr", optim.lr)),
                     "weight_decay": float(own.get(role, {}).get("weight_decay", default_wd))}
    return out
