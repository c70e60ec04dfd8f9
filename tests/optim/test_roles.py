"""Per-role learning rates and weight decay (rankscope.optim.roles), for every registered method:
unset or equal to the method's own values they change nothing, bit for bit; set, each reaches
exactly its parameters; a role a method steps in a group of its own is refused; and the effective
settings of every group are recorded by the trainer."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from helpers import TINY_RUN
from rankscope import methods
from rankscope.config import build_config
from rankscope.errors import ConfigError
from rankscope.methods import tuned
from rankscope.models import get_preset, token_losses
from rankscope.optim import GaLoreAdamW
from rankscope.optim.roles import apply_role_settings, parameter_roles
from rankscope.train.setup import build_run_model, build_run_optimizer, resolve_optim

ALL_METHODS = methods.names()
VOCAB = 256
# Short periods, so that the methods' periodic work (merges, projector refreshes, exact steps)
# happens inside the few steps these tests train.
PERIODS = {"relora": ["method.reset_every=3", "method.restart_warmup=1"], "galore": ["method.update_proj_gap=3"],
           "fira": ["method.update_proj_gap=3"], "loro": ["method.exact_every=3", "method.rewarm_steps=1"]}
# Distinct values per role, none equal to any method's default.
ROLE_VALUES = {"embed": (0.0123, 0.031), "head": (0.0071, 0.052), "norm": (0.0049, 0.017)}


@pytest.fixture(autouse=True)
def _literature_defaults(monkeypatch):
    """The methods' official defaults, which set no per-role value: the shipped tuned table sets
    the dense lrs, and "unset" has to mean the method's own lr for these tests to say anything."""
    monkeypatch.setattr(tuned, "tuned_table", lambda: {})


def _build(name: str, *extra: str):
    cfg = build_config({}, TINY_RUN + [f"method.name={name}", *PERIODS.get(name, []), *extra])
    model_cfg = dataclasses.replace(get_preset("tiny"), num_layers=2, vocab_size=VOCAB)
    model, method = build_run_model(cfg, model_cfg)
    optim = resolve_optim(cfg, type(method))
    return model, method, optim, build_run_optimizer(method, model, optim)


def _train(name: str, *extra: str, steps: int = 7):
    """The trainer's step sequence (schedule multiplier per group, clipping, step, periodic work)."""
    model, method, optim, optimizer = _build(name, *extra)
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    generator = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        multiplier = method.lr_multiplier(step, optim)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * multiplier
        batch = torch.randint(0, VOCAB, (4, 16), generator=generator)
        token_losses(model, batch).mean().backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                       optim.grad_clip if optim.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(step, model, optimizer)
    return model


def _own_values(name: str) -> tuple[float, float]:
    _, _, optim, _ = _build(name)
    return optim.lr, optim.weight_decay


@pytest.mark.parametrize("name", ALL_METHODS)
def test_per_role_settings_equal_to_the_methods_own_reproduce_the_single_lr_run_bit_for_bit(name):
    lr, weight_decay = _own_values(name)
    single = _train(name)
    split = [f"optim.{role}_{kind}={value}" for role in ("embed", "head", "norm")
             for kind, value in (("lr", lr), ("weight_decay", weight_decay))]
    # Under the "matrices" scope the norms are not decayed: equal means equal to what they get.
    if resolve_optim(build_config({}, [f"method.name={name}"]), methods.get(name)).weight_decay_scope == "matrices":
        split[-1] = "optim.norm_weight_decay=0.0"
    per_role = _train(name, *split)
    a, b = single.state_dict(), per_role.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{name}: {key} differs"


def _group_of(optimizer) -> dict[int, dict]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("name", ALL_METHODS)
def test_each_roles_lr_and_weight_decay_reach_exactly_its_parameters(name):
    settings = [f"optim.{role}_{kind}={value}" for role, values in ROLE_VALUES.items()
                for kind, value in zip(("lr", "weight_decay"), values)]
    model, _, _, optimizer = _build(name, *settings)
    base_model, _, _, base_optimizer = _build(name)
    roles = parameter_roles(model)
    assert sorted(set(roles.values())) == ["embed", "head", "norm"]
    groups, base_groups = _group_of(optimizer), _group_of(base_optimizer)
    base_params = dict(base_model.named_parameters())
    for param_name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = groups[id(p)]
        role = roles.get(id(p))
        if role is not None:
            assert (group["lr"], group["weight_decay"]) == ROLE_VALUES[role], param_name
            assert all(roles.get(id(q)) == role for q in group["params"]), f"{param_name} shares a group with another role"
        else:  # every other parameter keeps the group the method gave it, with its values
            base = base_groups[id(base_params[param_name])]
            assert {k: v for k, v in group.items() if k != "params"} == {k: v for k, v in base.items() if k != "params"}


@pytest.mark.parametrize("name", ALL_METHODS)
def test_a_zero_role_lr_keeps_exactly_that_role_still(name):
    start = _build(name)[0].state_dict()
    trained = _train(name, "optim.embed_lr=0", "optim.norm_lr=0", steps=4).state_dict()
    for key, value in trained.items():
        if key.endswith("embed_tokens.weight") or "norm" in key.split(".")[-2]:
            assert torch.equal(value, start[key]), key
    assert not torch.equal(trained["lm_head.weight"], start["lm_head.weight"])


def test_a_role_in_a_group_with_method_keys_is_refused_with_the_method_and_group_named():
    model, _, _, _ = _build("full")
    optimizer = GaLoreAdamW([{"params": [model.embed_tokens.weight], "rank": 4, "name": "galore"},
                             {"params": [p for n, p in model.named_parameters() if n != "embed_tokens.weight"]}])
    with pytest.raises(ConfigError, match=r"galore steps embed_tokens.weight in its group 'galore' with method keys"):
        apply_role_settings(model, optimizer, {"embed": {"lr": 0.01}}, method="galore")


@pytest.mark.parametrize("setting", ["optim.embed_lr=-1", "optim.norm_weight_decay=nan"])
def test_a_bad_role_value_is_one_clear_error(setting):
    with pytest.raises(ConfigError, match=r"must be a finite number >= 0"):
        resolve_optim(build_config({}, [setting]), methods.get("full"))


def test_the_trainer_records_every_groups_effective_lr_and_weight_decay(tmp_path):
    from rankscope.train import checkpoint as ckpt
    from rankscope.train.trainer import train

    cfg = build_config({}, TINY_RUN + ["method.name=galore", "train.steps=2", "optim.lr=0.02", "optim.embed_lr=0.005",
                                       "optim.head_weight_decay=0.1"])
    summary = train(cfg, tmp_path / "run")
    groups = {g["name"]: g for g in summary["param_groups"]}
    assert {k: v for k, v in groups["adamw_embed"].items() if k != "elements"} == {
        "name": "adamw_embed", "lr": 0.005, "weight_decay": 0.0, "plain": True, "roles": ["embed"], "tensors": 1}
    assert groups["adamw_head"]["lr"] == 0.02 and groups["adamw_head"]["weight_decay"] == 0.1
    assert groups["galore"]["roles"] == ["blocks"] and not groups["galore"]["plain"]
    assert groups["adamw"]["roles"] == ["norm"]  # what stays in the method's own plain group
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["param_groups"] == summary["param_groups"]
    meta = json.loads((ckpt.list_checkpoints(tmp_path / "run")[-1].path / "meta.json").read_text())
    assert meta["param_groups"] == summary["param_groups"]
