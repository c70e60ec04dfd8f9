"""GoLore as a method: its groups, where the random phase starts, its seed and its schedule."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import build_tiny_method  # tests/ is on sys.path
from rankscope import methods
from rankscope.errors import ConfigError
from rankscope.methods.base import check_param_groups
from rankscope.models import build_model, get_preset, iter_target_linears
from rankscope.optim import GoLoreAdamW


def _built(seed=0, total_steps=1000, warmup_steps=10, **changes):
    return build_tiny_method("golore", total_steps=total_steps, warmup_steps=warmup_steps, seed=seed, **changes)


def test_official_defaults_and_group_order():
    method, model, optimizer, _ = _built()
    assert isinstance(optimizer, GoLoreAdamW)
    check_param_groups(model, optimizer)
    plain, projected = optimizer.param_groups  # the plain group first, as torchrun_main.py builds them
    assert "rank" not in plain
    assert [id(p) for p in projected["params"]] == [id(m.weight) for *_, m in iter_target_linears(model)]
    assert (projected["scale"], projected["update_proj_gap"], projected["reproject_moments"]) == (1.0, 200, "first_transient")
    assert projected["random_from_step"] == 800  # 0.8 x 1000
    d = methods.get("golore").optim_defaults("60m")
    assert (d.lr, d.weight_decay, d.eps, d.grad_clip) == (1e-3, 0.0, 1e-6, 1.0)
    assert methods.get("golore").default_settings("60m", get_preset("60m")).rank == 128


def test_random_phase_starts_where_the_reference_compares_step_to_ratio_times_steps():
    for total in (10, 7, 333, 15000):
        method, _, optimizer, _ = _built(total_steps=total)
        start = optimizer.param_groups[1]["random_from_step"]
        assert start == min(step for step in range(total + 2) if step >= 0.8 * total)
    _, _, optimizer, _ = _built(total_steps=15000, random_from=8000)
    assert optimizer.param_groups[1]["random_from_step"] == 8000


def test_projection_seed_is_the_runs_seed():
    seeds = [_built(seed=s)[2].param_groups[1]["projection_seed"] for s in (0, 0, 5)]
    assert seeds[0] == seeds[1] == 0 and seeds[2] == 5
    # Reading it draws nothing: the global stream after parameterize is the one GaLore leaves.
    method = _built()[0]
    torch.manual_seed(3)
    build_model(method.model_config)
    after_build = torch.rand(4)
    torch.manual_seed(3)
    method.parameterize(build_model(method.model_config))
    assert torch.equal(torch.rand(4), after_build)


def test_cycle_length_gives_the_official_restarting_schedule():
    method, _, _, optim = _built(total_steps=15000, warmup_steps=1000, cycle_length=10000)
    # Update k runs at the harness's scheduler step k - 1.
    assert method.lr_multiplier(1, optim) == 0.0
    assert method.lr_multiplier(10001, optim) == 1e-7
    assert method.lr_multiplier(15001, optim) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 4 / 9)))
    plain, *_ = _built(total_steps=15000, warmup_steps=1000)
    assert plain.lr_multiplier(1, optim) == pytest.approx(1e-3)  # rankscope's convention otherwise


@pytest.mark.parametrize(("changes", "match"), [
    ({"reproject_moments": "second"}, "reproject_moments"), ({"random_ratio": -0.1}, "random_ratio"),
    ({"random_from": -1}, "random_from"), ({"cycle_length": 0}, "cycle_length"), ({"proj_type": "full"}, "proj_type"),
])
def test_bad_settings_name_the_setting(changes, match):
    with pytest.raises(ConfigError, match=match):
        _built(**changes)
