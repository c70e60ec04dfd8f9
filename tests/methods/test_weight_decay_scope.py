"""optim.weight_decay_scope: which parameters weight decay acts on, per method's official harness."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import TINY_RUN  # tests/ is on sys.path (rootdir conftest, no __init__.py)
from rankscope import methods
from rankscope.config import build_config
from rankscope.errors import ConfigError
from rankscope.methods.base import check_param_groups
from rankscope.models import get_preset, token_losses
from rankscope.train.setup import build_run_model, resolve_optim

# Every official harness hands all trainable tensors to one torch optimizer with one weight decay
# (GaLore / SLTrain / ReLoRA / CoLA torchrun_main, LORO run_c4.py); NVIDIA's Spectron optimizer
# takes the 2-D factors only.
OFFICIAL_SCOPE = {name: "all" for name in methods.names()} | {"spectron": "matrices"}


def _build(name: str, *extra: str):
    cfg = build_config({}, TINY_RUN + [f"method.name={name}", "optim.weight_decay=0.1", *extra])
    model, method = build_run_model(cfg, dataclasses.replace(get_preset("tiny"), num_layers=2, vocab_size=256), 0)
    optimizer = method.build_optimizer(model, resolve_optim(cfg, type(method)))
    return model, optimizer


def _decay_of(optimizer, parameter) -> float:
    return next(g["weight_decay"] for g in optimizer.param_groups if any(p is parameter for p in g["params"]))


def test_default_scope_is_each_methods_official_harness():
    for name in methods.names():
        assert methods.get(name).optim_defaults("60m").weight_decay_scope == OFFICIAL_SCOPE[name], name


@pytest.mark.parametrize("name", methods.names())
def test_matrices_scope_exempts_exactly_the_norm_gains(name):
    model, optimizer = _build(name, "optim.weight_decay_scope=matrices")
    check_param_groups(model, optimizer)
    for parameter_name, parameter in model.named_parameters():
        if parameter.requires_grad:
            expected = 0.0 if "norm" in parameter_name else 0.1
            assert _decay_of(optimizer, parameter) == expected, (name, parameter_name)


@pytest.mark.parametrize("name", [n for n in methods.names() if OFFICIAL_SCOPE[n] == "all"])
def test_all_scope_decays_the_norm_gains_too(name):
    model, optimizer = _build(name)
    assert _decay_of(optimizer, model.norm.weight) == 0.1
    assert _decay_of(optimizer, model.embed_tokens.weight) == 0.1


def test_a_norm_gain_keeps_its_value_under_matrices_but_decays_under_all():
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    moved = {}
    for scope in ("all", "matrices"):
        model, optimizer = _build("full", f"optim.weight_decay_scope={scope}", "optim.lr=0.5")
        gain = model.norm.weight
        token_losses(model, ids).mean().backward()
        gain.grad.zero_()  # no gradient: only the decay can move the gain
        optimizer.step()
        moved[scope] = (gain.detach() - 1.0).abs().max().item()
    assert moved["matrices"] == 0.0 and moved["all"] == pytest.approx(0.5 * 0.1)


def test_trainable_scales_count_as_scalars():
    model, optimizer = _build("relora", "method.trainable_scaling=true", "optim.weight_decay_scope=matrices")
    scales = [p for n, p in model.named_parameters() if n.endswith("scaling")]
    assert scales and all(_decay_of(optimizer, p) == 0.0 for p in scales)
    assert _decay_of(optimizer, model.layers[0].self_attn.q_proj.A) == 0.1


def test_an_unknown_scope_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="weight_decay_scope.*all, matrices"):
        build_config({}, TINY_RUN + ["optim.weight_decay_scope=norms"])
