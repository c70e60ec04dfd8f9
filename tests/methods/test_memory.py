"""Memory accounting: hand-computed counts, the materialisation step, and the methods table."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from rankscope import methods
from rankscope.cli import main
from rankscope.errors import ConfigError, RankscopeError
from rankscope.methods.base import ResolvedOptim
from rankscope.methods.memory_accounting import account_memory
from rankscope.methods.memory_table import (
    PUBLISHED_LORO_TABLE1,
    materialize_optimizer_state,
    measure_method,
    memory_table,
    print_memory_table,
)
from rankscope.models import build_model, get_preset
from rankscope.optim import GaLoreAdamW, LoroAdamW, Spectron


def _tiny_model():
    torch.manual_seed(0)
    return build_model(dataclasses.replace(get_preset("tiny"), num_layers=2))


def test_full_adamw_holds_two_floats_of_state_per_parameter():
    model = _tiny_model()
    n = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    materialize_optimizer_state(model, optimizer)
    m = account_memory(model, optimizer)
    assert m["total_params"] == m["trainable_params"] == n and m["frozen_params"] == 0
    assert m["param_bytes"] == 4 * n
    assert m["optimizer_state_elements"] == 2 * n
    assert m["optimizer_state_projector_elements"] == 0
    # every tensor counted in the measured bytes: two fp32 moments plus one fp32 step per parameter
    n_tensors = len(list(model.parameters()))
    assert m["optimizer_state_bytes"] == 4 * 2 * n + 4 * n_tensors
    assert m["estimated_weight_bytes"] == 2 * n
    assert m["estimated_memory_bytes"] == 2 * (n + 2 * n) == m["estimated_memory_bytes_without_projectors"]


def test_frozen_weights_count_as_weights_but_carry_no_state():
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 4, bias=True))
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    materialize_optimizer_state(model, optimizer)
    m = account_memory(model, optimizer)
    assert (m["total_params"], m["trainable_params"], m["frozen_params"]) == (54, 24, 30)
    assert m["optimizer_state_elements"] == 2 * 24
    assert m["estimated_memory_bytes"] == 2 * (54 + 48)


@pytest.mark.parametrize(("shape", "side_elements"), [((12, 8), 3 * 8), ((8, 12), 8 * 3)])
def test_galore_state_is_moments_in_the_projected_space_plus_the_projector(shape, side_elements):
    weight = nn.Parameter(torch.randn(*shape))
    holder = nn.Module()
    holder.weight = weight
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 3, "update_proj_gap": 10}], lr=0.01)
    materialize_optimizer_state(holder, optimizer)
    m = account_memory(holder, optimizer)
    # std projection onto the short side: moments are max(m, n) x r each, projector min(m, n) x r
    assert m["optimizer_state_elements"] == 2 * 12 * 3 + side_elements
    assert m["optimizer_state_projector_elements"] == side_elements


def test_loro_and_spectron_state_counts():
    model = nn.Module()
    model.B = nn.Parameter(torch.randn(10, 2))
    model.A = nn.Parameter(torch.randn(2, 7))
    model.norm = nn.Parameter(torch.ones(7))
    loro = LoroAdamW([{"params": [model.B, model.A], "factor_pairs": True, "exact_every": 5},
                      {"params": [model.norm]}], lr=0.01)
    materialize_optimizer_state(model, loro)
    # Adam moments on the factors and the plain parameter; LORO's counters are scalars.
    assert account_memory(model, loro)["optimizer_state_elements"] == 2 * (20 + 14 + 7)
    spectron = Spectron([{"params": [model.B, model.A], "factor_pairs": True}, {"params": [model.norm]}], lr=0.01)
    materialize_optimizer_state(model, spectron)
    # one momentum per factor + a power-iteration vector on each factor's long side (10 and 7,
    # as NVIDIA's) + AdamW's two moments for the norm
    assert account_memory(model, spectron)["optimizer_state_elements"] == (20 + 14) + (10 + 7) + 2 * 7


@pytest.mark.parametrize("name", ["full", "galore", "fira", "loro", "spectron"])
def test_materialising_the_state_leaves_the_weights_untouched(name):
    cls = methods.get(name)
    cfg = dataclasses.replace(get_preset("tiny"), num_layers=2)
    method = cls(cls.default_settings("tiny", cfg), cfg, "tiny")
    torch.manual_seed(0)
    model = method.parameterize(build_model(cfg))
    d = cls.optim_defaults("tiny")
    optimizer = method.build_optimizer(model, ResolvedOptim(d.lr, d.weight_decay, (0.9, 0.999), d.eps, d.grad_clip, 10, 1, 0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lrs = [g["lr"] for g in optimizer.param_groups]
    materialize_optimizer_state(model, optimizer)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [g["lr"] for g in optimizer.param_groups] == lrs
    assert len(optimizer.state) == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["galore", "fira"])
def test_projector_prefill_has_exactly_the_sizes_of_the_svd_path(name):
    cls = methods.get(name)
    fast = measure_method(cls, "tiny", skip_svd=True, mode="measured")
    exact = measure_method(cls, "tiny", skip_svd=False, mode="measured")
    assert fast == exact
    assert fast["optimizer_state_projector_elements"] > 0


def test_shapes_on_the_meta_device_count_exactly_what_real_tensors_hold():
    """Every method, every count and byte: the meta-device table is the measured one."""
    for name in methods.names():
        cls = methods.get(name)
        assert measure_method(cls, "tiny", mode="shapes") == measure_method(cls, "tiny", mode="measured"), name


def test_memory_table_at_7b_from_shapes_with_progress():
    from rankscope.models import count_parameters

    lines = []
    rows = memory_table("7b", ["full", "galore"], progress=lines.append)
    full, galore = rows
    assert full["total_params"] == count_parameters(get_preset("7b"))
    assert full["optimizer_state_elements"] == 2 * full["total_params"]
    assert galore["optimizer_state_projector_elements"] > 0
    assert galore["optimizer_state_elements"] < full["optimizer_state_elements"]
    assert len(lines) == 4 and lines[0].startswith("[1/2] full at 7b") and "done in" in lines[1]
    assert all(r["seconds"] >= 0 for r in rows)


def test_memory_table_rejects_unknown_names_before_any_work():
    with pytest.raises(RankscopeError, match="did you mean 'galore'"):
        memory_table("350m", ["full", "gallore"])
    with pytest.raises(ConfigError, match="memory mode"):
        memory_table("tiny", ["full"], mode="guess")


def test_cli_memory_table_at_a_large_preset(capsys):
    assert main(["methods", "--memory", "--preset", "7b", "--methods", "lowrank"]) == 0
    out = capsys.readouterr().out
    assert "lowrank" in out and "meta device" in out
    assert main(["methods", "--memory", "--preset", "tiny", "--methods", "full", "--measured"]) == 0
    captured = capsys.readouterr()
    assert "Measured on real tensors" in captured.out and "[1/1] full at tiny (measured)" in captured.err


def test_memory_table_covers_every_method_at_tiny(capsys):
    names = methods.names()
    rows = memory_table("tiny", names)
    assert [r["method"] for r in rows] == names
    by_name = {r["method"]: r for r in rows}
    missing = [n for n, r in by_name.items() if "error" in r]
    assert not missing, missing
    full = by_name["full"]
    for low_rank in ("loro", "lowrank"):
        assert by_name[low_rank]["total_params"] < full["total_params"]
        assert by_name[low_rank]["estimated_memory_bytes"] < full["estimated_memory_bytes"]
    # GaLore keeps the dense weights but less optimizer state than full AdamW.
    assert by_name["galore"]["total_params"] == full["total_params"]
    assert by_name["galore"]["optimizer_state_elements"] < full["optimizer_state_elements"]
    assert all("published_mem_gb" not in r for r in rows)  # no published numbers for tiny
    print_memory_table(rows, "tiny")
    assert "loro" in capsys.readouterr().out


def test_published_table_matches_the_full_model_sizes():
    # LORO Table 1 counts parameters in millions: the dense presets must agree to rounding.
    for preset, table in PUBLISHED_LORO_TABLE1.items():
        n = sum(p.numel() for p in _count_only(preset))
        assert abs(n / 1e6 - table["full"][0]) < 1.0, preset


def _count_only(preset):
    """Parameter shapes of the dense preset without allocating its weights."""
    with torch.device("meta"):
        return list(build_model(get_preset(preset)).parameters())
