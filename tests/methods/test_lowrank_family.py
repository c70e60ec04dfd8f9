"""The factorized methods lowrank, lora, relora, sltrain and cola: settings, parameterization,
optimizer groups and each method's own mechanics (ReLoRA's merges, pruning and jagged LR,
SLTrain's fixed support, LoRA's frozen W0, CoLA's gated MLP), each against its official code."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from helpers import TINY_RUN, train_interrupted  # tests/ is on sys.path (rootdir conftest, no __init__.py)
from rankscope.config import build_config
from rankscope.errors import ConfigError
from rankscope.methods import get
from rankscope.methods.base import ResolvedOptim, check_param_groups
from rankscope.methods.cola import ColaMLP
from rankscope.models import NotDenseError, build_model, dense_state_dict, get_preset, token_losses
from rankscope.nn import ColaLinear, LoRALinear, LowRankLinear, SparsePlusLowRankLinear
from rankscope.nn.sparse import support_size
from rankscope.optim.schedules import cosine_with_warmup
from rankscope.train import checkpoint as ckpt
from rankscope.train.setup import build_method, build_run_model, resolve_optim
from rankscope.train.trainer import train

FAMILY = ("lowrank", "lora", "relora", "sltrain", "cola")
LAYER_TYPE = {
    "lowrank": LowRankLinear, "lora": LoRALinear, "relora": LoRALinear,
    "sltrain": SparsePlusLowRankLinear, "cola": ColaLinear,
}
VOCAB = 256


def _config(name: str, *extra: str):
    return build_config({}, TINY_RUN + [f"method.name={name}", *extra])


def _model_config(vocab: int = VOCAB):
    return dataclasses.replace(get_preset("tiny"), num_layers=2, vocab_size=vocab)


def _build(name: str, *extra: str, seed: int = 0):
    """Model, method and optimizer of a run on a small vocabulary (no data needed)."""
    cfg = _config(name, *extra)
    model, method = build_run_model(cfg, _model_config(), seed)
    optimizer = method.build_optimizer(model, resolve_optim(cfg, type(method)))
    return model, method, optimizer


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(seed))


def _train_steps(model, optimizer, steps: int, method=None, first_step: int = 0) -> None:
    """Plain steps as the trainer takes them (fixed lr), with the method's after_step hook."""
    for step in range(first_step, first_step + steps):
        token_losses(model, _batch(step)).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if method is not None:
            method.after_step(step + 1, model, optimizer)


def _layers(model, kind=LoRALinear):
    return [m for m in model.modules() if isinstance(m, kind)]


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY)
def test_default_rank_follows_the_literature_per_preset(name):
    expected = {"tiny": 32, "20m": 64, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
    for preset, rank in expected.items():
        assert get(name).default_settings(preset, get_preset(preset)).rank == rank, preset


def test_method_specific_defaults():
    relora = get("relora")
    for preset, every in {"60m": 1000, "130m": 5000, "350m": 5000}.items():
        s = relora.default_settings(preset, get_preset(preset))
        assert (s.reset_every, s.restart_warmup, s.alpha, s.cycle_length) == (every, 100, 32.0, None)
        assert (s.prune_ratio, s.prune_mode, s.warm_start_steps) == (0.999, "random", 0)
        # relora.py / torchrun_main.py @176f376: A zeroed at wrap, lora_dropout 0.1, fixed scale.
        assert (s.initial_a, s.dropout, s.trainable_scaling, s.schedule) == ("zero", 0.1, False, "official")
    assert [relora.optim_defaults(p).lr for p in ("60m", "130m", "350m")] == [1e-3, 1e-3, 5e-4]

    sltrain = get("sltrain")
    for preset, alpha in {"60m": 32.0, "130m": 16.0, "350m": 16.0, "1b": 8.0, "7b": 8.0}.items():
        s = sltrain.default_settings(preset, get_preset(preset))
        assert (s.alpha, s.density, s.trainable_scaling) == (alpha, 0.05 if preset == "7b" else 0.03, False)
        assert sltrain.optim_defaults(preset).lr == 3e-3

    cola = get("cola")
    for preset, lr in {"60m": 6e-3, "130m": 3e-3, "350m": 3e-3, "1b": 2e-3}.items():
        defaults = cola.optim_defaults(preset)
        assert (defaults.lr, defaults.weight_decay, defaults.grad_clip) == (lr, 0.01, 0.5)
        assert defaults.weight_decay_scope == "all"  # torch AdamW over every parameter
    # only_lr_act: false in cola_60m.json / cola_130m.json, the class default (true) from 350M up.
    outer = {p: cola.default_settings(p, get_preset(p)).outer_activation for p in ("tiny", "60m", "130m", "350m", "1b", "7b")}
    assert outer == {"tiny": True, "60m": True, "130m": True, "350m": False, "1b": False, "7b": False}

    assert get("lora").default_settings("60m", get_preset("60m")).dropout == 0.1
    for name in ("lowrank", "lora"):
        assert get(name).optim_defaults("60m").lr == 1e-3
        assert get(name).default_settings("60m", get_preset("60m")).targets == [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
        ]


def test_clipping_is_off_where_the_official_harness_has_none():
    """GaLore's, SLTrain's and LORO's harnesses default to --grad_clipping 0.0 and their scripts
    keep it (SLTrain's 7B script passes 1.0); ReLoRA's (and its LoRA baseline's)
    --clip_grad_norm defaults to 1.0; CoLA's scripts pass 0.5."""
    expected = {"full": 0.0, "lowrank": 0.0, "galore": 0.0, "fira": 0.0, "loro": 0.0, "spectron": 0.0,
                "lora": 1.0, "relora": 1.0, "cola": 0.5, "sltrain": 0.0}
    for preset in ("tiny", "60m", "130m", "350m", "1b"):
        assert {name: get(name).optim_defaults(preset).grad_clip for name in expected} == expected, preset
    assert get("sltrain").optim_defaults("7b").grad_clip == 1.0
    cfg = _config("sltrain")  # what a run resolves to when the config leaves optim.grad_clip unset
    assert resolve_optim(cfg, type(build_method(cfg, _model_config()))).grad_clip == 0.0


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("lowrank", ["method.rank=0"], "integer >= 1"),
        ("lowrank", ["method.rank=128"], "below min"),
        ("lowrank", ["method.targets=q_proj,qproj"], "qproj"),
        ("lowrank", ["method.targets=q_proj,q_proj"], "twice"),
        ("lora", ["method.alpha=0"], "alpha"),
        ("relora", ["method.reset_every=0"], "reset_every"),
        ("relora", ["method.restart_warmup=200"], "restart_warmup"),
        ("relora", ["method.prune_ratio=1.5"], "prune_ratio"),
        ("relora", ["method.prune_mode=topk"], "prune_mode"),
        ("relora", ["method.warm_start_steps=-1"], "warm_start_steps"),
        ("relora", ["method.cycle_length=0"], "cycle_length"),
        ("relora", ["method.schedule=cosine"], "schedule"),
        ("relora", ["method.initial_a=normal"], "initial_a"),
        ("relora", ["method.dropout=1.0"], "dropout"),
        ("sltrain", ["method.density=0"], "density"),
        ("sltrain", ["method.density=1.5"], "density"),
        ("sltrain", ["method.density=1e-6"], "density"),
        ("cola", ["method.activation=tanh"], "activation"),
        ("cola", ["method.outer_activation=false", "method.targets=q_proj,up_proj,down_proj"], "outer_activation"),
    ],
)
def test_bad_settings_raise_config_error(name, overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_method(_config(name, *overrides), _model_config())


# -- parameterization and optimizer groups -------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY)
def test_parameterize_replaces_every_target_and_groups_the_factors(name):
    model, _, optimizer = _build(name)
    replaced = [m for m in model.modules() if isinstance(m, LAYER_TYPE[name])]
    assert len(replaced) == 2 * 7
    assert not any(isinstance(m, nn.Linear) for m in model.layers.modules())
    check_param_groups(model, optimizer)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    factors = {id(p) for layer in replaced for p in layer.parameters() if p.requires_grad}
    assert groups["targeted"] == factors
    assert id(model.embed_tokens.weight) in groups["other"] and id(model.lm_head.weight) in groups["other"]


def test_targets_setting_narrows_the_replacement():
    model, _, optimizer = _build("lowrank", "method.targets=q_proj,down_proj")
    for block in model.layers:
        assert isinstance(block.self_attn.q_proj, LowRankLinear) and isinstance(block.mlp.down_proj, LowRankLinear)
        assert isinstance(block.self_attn.k_proj, nn.Linear) and isinstance(block.mlp.up_proj, nn.Linear)
    check_param_groups(model, optimizer)
    other = {id(p) for g in optimizer.param_groups if g["name"] == "other" for p in g["params"]}
    assert id(model.layers[0].mlp.up_proj.weight) in other


# -- LoRA ------------------------------------------------------------------------------------------


def test_lora_w0_is_the_dense_init_gets_no_gradient_and_stays_fixed():
    model, _, optimizer = _build("lora")
    torch.manual_seed(0)
    dense = build_model(_model_config())
    layers = _layers(model)
    assert torch.equal(model.layers[1].mlp.up_proj.weight, dense.layers[1].mlp.up_proj.weight)
    before = [layer.weight.detach().clone() for layer in layers]
    token_losses(model, _batch()).mean().backward()
    assert all(layer.weight.grad is None for layer in layers)
    assert all(layer.B.grad.abs().sum() > 0 for layer in layers)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _train_steps(model, optimizer, 2)
    for layer, w0 in zip(layers, before):
        assert torch.equal(layer.weight, w0)
        assert layer.B.abs().sum() > 0  # the adapter did train
        assert layer.weight not in optimizer.state


# -- ReLoRA ----------------------------------------------------------------------------------------
# With the official timing, the work of restart point p follows update p + 1: reset_every=2
# merges after update 3 (then 5, 7, ...).
TRAINED_ADAPTERS = ("method.reset_every=2", "method.restart_warmup=1", "method.initial_a=kaiming")


def test_relora_merge_leaves_the_logits_unchanged_and_restarts_the_adapters():
    model, method, optimizer = _build("relora", *TRAINED_ADAPTERS)
    _train_steps(model, optimizer, 3)  # no hook yet: B is non-zero now
    model.eval()  # no adapter dropout while comparing logits
    layers = _layers(model)
    merged = [layer.effective_weight().detach().clone() for layer in layers]
    old_A = [layer.A.detach().clone() for layer in layers]
    ids = _batch(99)
    with torch.no_grad():
        before = model(ids)
        method.after_step(2, model, optimizer)  # restart point 2 is handled after update 3
        assert all(torch.equal(layer.A, a) for layer, a in zip(layers, old_A))
        method.after_step(3, model, optimizer)
        after = model(ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for layer, weight, a in zip(layers, merged, old_A):
        torch.testing.assert_close(layer.weight, weight, rtol=0, atol=1e-7)
        assert torch.count_nonzero(layer.B) == 0
        assert not torch.equal(layer.A, a)


def test_relora_prunes_the_adapter_state_at_a_reset_only():
    model, method, optimizer = _build("relora", *TRAINED_ADAPTERS)
    _train_steps(model, optimizer, 3)
    embed_state = {k: v.clone() for k, v in optimizer.state[model.embed_tokens.weight].items()}
    adapters = [p for layer in _layers(model) for p in (layer.A, layer.B)]
    method.after_step(3, model, optimizer)
    for key in ("exp_avg", "exp_avg_sq"):
        kept = sum(int(torch.count_nonzero(optimizer.state[p][key])) for p in adapters)
        total = sum(optimizer.state[p][key].numel() for p in adapters)
        # Random pruning of 99.9% keeps each entry with probability 0.001: kept ~ Binomial(total,
        # 0.001); within 5 standard deviations of its mean (a ratio of 0.998 or 0.9995 falls outside).
        mean, sd = 1e-3 * total, (1e-3 * (1 - 1e-3) * total) ** 0.5
        assert abs(kept - mean) < 5 * sd, (key, kept, mean)
    for key, value in embed_state.items():
        assert torch.equal(optimizer.state[model.embed_tokens.weight][key], value), key


def test_relora_magnitude_pruning_keeps_the_largest_moments():
    model, method, optimizer = _build("relora", *TRAINED_ADAPTERS, "method.prune_mode=magnitude",
                                      "method.prune_ratio=0.75")
    _train_steps(model, optimizer, 3)
    layer = _layers(model)[0]
    old = optimizer.state[layer.B]["exp_avg"].clone()
    method.after_step(3, model, optimizer)
    new = optimizer.state[layer.B]["exp_avg"]
    kept = new != 0
    assert torch.equal(new[kept], old[kept])
    assert old[~kept].abs().max() <= old[kept].abs().min()
    # ReLoRA's magnitude_pruning keeps what lies above torch.quantile(|state|, ratio).
    assert torch.equal(kept, old.abs() > torch.quantile(old.abs().flatten(), 0.75))


def test_relora_reset_randomness_ignores_the_global_rng():
    results = []
    for global_seed in (1, 2):
        model, method, optimizer = _build("relora", *TRAINED_ADAPTERS)
        _train_steps(model, optimizer, 3)
        torch.manual_seed(global_seed)
        method.after_step(3, model, optimizer)
        results.append((_layers(model)[0].A.detach().clone(), optimizer.state[_layers(model)[0].A]["exp_avg"].clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_relora_starts_from_zero_adapters_that_get_no_gradient_until_the_first_merge():
    """The official wrapper zeroes A (so the wrapped model equals the original); with B = 0 too,
    neither factor has a gradient until a merge re-draws A."""
    model, method, optimizer = _build("relora", "method.reset_every=2", "method.restart_warmup=1")
    layers = _layers(model)
    assert all(not layer.A.any() and not layer.B.any() for layer in layers)
    token_losses(model, _batch()).mean().backward()
    assert all(not layer.A.grad.any() and not layer.B.grad.any() for layer in layers)
    optimizer.zero_grad(set_to_none=True)
    method.after_step(3, model, optimizer)  # the first merge re-draws A Kaiming-uniform
    token_losses(model, _batch()).mean().backward()
    assert all(layer.A.any() and layer.B.grad.any() for layer in layers)


def test_relora_adapter_dropout_acts_in_training_only():
    model, _, _ = _build("relora", "method.initial_a=kaiming")
    layer = _layers(model)[0]
    with torch.no_grad():
        layer.B.normal_(0.0, 0.1)
    x = torch.randn(64, layer.in_features)
    torch.manual_seed(0)
    train_a, train_b = layer(x), layer(x)
    layer.eval()
    assert not torch.equal(train_a, train_b)  # a fresh dropout mask per call
    torch.testing.assert_close(layer(x), x @ layer.effective_weight().T, rtol=1e-5, atol=1e-5)


def test_relora_trainable_scaling_is_tanh_of_a_scalar_that_a_merge_zeroes():
    model, method, optimizer = _build("relora", *TRAINED_ADAPTERS, "method.trainable_scaling=true")
    layer = _layers(model)[0]
    assert layer.scaling.shape == (1,) and layer.scaling.item() == 1.0
    with torch.no_grad():
        layer.B.normal_(0.0, 0.1)
    layer.eval()
    x = torch.randn(5, layer.in_features)
    expected = x @ layer.weight.T + math.tanh(1.0) * (x @ layer.A.T) @ layer.B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    check_param_groups(model, optimizer)  # the scalars train, in the targeted group
    with torch.no_grad():
        before = layer(x)
    layer.merge_and_reinit(torch.Generator().manual_seed(0))
    assert layer.scaling.item() == 0.0  # as the official merge_and_reinit: tanh(0) = 0 from here on
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-6)


def _optim(total: int = 100, warmup: int = 10) -> ResolvedOptim:
    return ResolvedOptim(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, grad_clip=1.0,
                         total_steps=total, warmup_steps=warmup, min_lr_ratio=0.1)


def _official_relora_lambda(s, total, warmup, cycle, restart_warmup, min_ratio=0.1):
    """relora training_utils._get_cosine_schedule_with_multiple_warmups_lambda (adjust_step 0),
    transcribed independently."""
    if s < warmup:
        return s / warmup
    restart_step, restart_number = s % cycle, s // cycle
    if restart_step < restart_warmup and s >= cycle:
        progress = (restart_number * cycle + restart_warmup - warmup) / (total - warmup)
        return restart_step / restart_warmup * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    progress = (s - warmup) / (total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def test_relora_lr_is_the_official_jagged_cosine_stepped_after_each_update():
    _, method, _ = _build("relora", "method.reset_every=20", "method.restart_warmup=5")
    optim = _optim()
    for k in range(1, 101):  # update k uses the scheduler's value at step k - 1
        assert method.lr_multiplier(k, optim) == pytest.approx(_official_relora_lambda(k - 1, 100, 10, 20, 5), abs=1e-12), k
    assert [method.lr_multiplier(k, optim) for k in (1, 21, 41)] == [0.0, 0.0, 0.0]  # restart points: lr 0
    envelope = lambda step: cosine_with_warmup(step, 100, 10, 0.1)  # noqa: E731
    assert method.lr_multiplier(23, optim) == pytest.approx(2 / 5 * envelope(25))


def test_relora_shifted_schedule_keeps_the_envelope_at_the_restart_point():
    _, method, _ = _build("relora", "method.reset_every=20", "method.restart_warmup=5", "method.schedule=shifted")
    optim = _optim()
    envelope = lambda step: cosine_with_warmup(step, 100, 10, 0.1)  # noqa: E731
    for k in range(1, 101):
        reset = (k - 1) // 20 * 20
        if reset > 0 and k - reset < 5:  # re-warm: 1/5, 2/5, ... of the envelope at reset + 5
            expected = (k - reset) / 5 * envelope(reset + 5)
        else:
            expected = envelope(k)
        assert method.lr_multiplier(k, optim) == pytest.approx(expected, abs=1e-12), k
    assert method.lr_multiplier(20, optim) == envelope(20)


def test_relora_merges_follow_the_update_after_each_restart_point_and_never_the_last():
    """torchrun_main.py merges when (update_step - start) % relora == 1, i.e. after updates
    R + 1, 2R + 1, ...; the loop ends before merging after the final update."""
    model, method, _ = _build("relora", "method.reset_every=20", "train.steps=81")
    assert [s for s in range(1, 82) if method.is_reset_step(s)] == [21, 41, 61]  # not 81: the last update
    _, shifted, _ = _build("relora", "method.reset_every=20", "method.schedule=shifted", "train.steps=80")
    assert [s for s in range(1, 81) if shifted.is_reset_step(s)] == [20, 40, 60]


def test_relora_cycle_length_prunes_without_merging():
    model, method, optimizer = _build("relora", "method.reset_every=4", "method.cycle_length=2",
                                      "method.restart_warmup=1", "method.initial_a=kaiming")
    _train_steps(model, optimizer, 3)
    layer = _layers(model)[0]
    A, moments = layer.A.detach().clone(), optimizer.state[layer.A]["exp_avg"].clone()
    method.after_step(3, model, optimizer)  # point 2: a cycle restart, not a merge
    assert torch.equal(layer.A, A) and layer.B.any()
    assert torch.count_nonzero(optimizer.state[layer.A]["exp_avg"]) < 0.01 * moments.numel()
    _train_steps(model, optimizer, 2, first_step=3)
    method.after_step(5, model, optimizer)  # point 4: merge and prune
    assert not layer.B.any() and not torch.equal(layer.A, A)


def test_relora_warm_start_shifts_the_resets_and_rewarms_at_the_switch():
    _, method, _ = _build("relora", "method.reset_every=20", "method.restart_warmup=5", "method.warm_start_steps=15",
                          "method.schedule=shifted")
    optim = _optim()
    envelope = lambda step: cosine_with_warmup(step, 100, 10, 0.1)  # noqa: E731
    assert [method.is_reset_step(s) for s in (15, 20, 35, 55, 40)] == [True, False, True, True, False]
    assert method.lr_multiplier(15, optim) == envelope(15)
    assert method.lr_multiplier(16, optim) == pytest.approx(envelope(20) / 5)
    assert method.lr_multiplier(20, optim) == envelope(20)
    assert method.lr_multiplier(21, optim) == envelope(21)  # no reset at reset_every itself
    assert method.lr_multiplier(36, optim) == pytest.approx(envelope(40) / 5)
    _, official, _ = _build("relora", "method.reset_every=20", "method.warm_start_steps=15")
    assert [official.is_reset_step(s) for s in (15, 16, 35, 36, 56)] == [False, True, False, True, True]


def test_relora_warm_start_trains_w0_then_freezes_it_and_drops_its_state():
    model, method, optimizer = _build("relora", "method.warm_start_steps=2", "method.reset_every=3",
                                      "method.restart_warmup=1", "method.schedule=shifted")
    check_param_groups(model, optimizer)
    names = [g["name"] for g in optimizer.param_groups]
    assert "warm_start_dense" in names
    layers = _layers(model)
    initial = [layer.weight.detach().clone() for layer in layers]
    _train_steps(model, optimizer, 1, method)
    assert all(not torch.equal(layer.weight, w) for layer, w in zip(layers, initial))  # dense training
    _train_steps(model, optimizer, 1, method, first_step=1)  # after_step(2): the switch
    assert all(not layer.weight.requires_grad and layer.weight not in optimizer.state for layer in layers)
    assert all(torch.count_nonzero(layer.B) == 0 for layer in layers)
    frozen = [layer.weight.detach().clone() for layer in layers]
    _train_steps(model, optimizer, 2, method, first_step=2)  # steps 3 and 4: no reset until 5
    for layer, w in zip(layers, frozen):
        assert layer.weight.grad is None and torch.equal(layer.weight, w)
    assert method.state_dict()["steps_done"] == 4


def _interrupted(cfg, run_dir, after: int):
    """Train `cfg` in `run_dir`, crash it as update `after` + 1 completes, then resume it."""
    train_interrupted(cfg, run_dir, after_step=after + 1)
    return train(cfg, run_dir)


def _checkpoint(run_dir, step):
    return load_file(str(next(c for c in ckpt.list_checkpoints(run_dir) if c.step == step).path / "model.safetensors"))


@pytest.mark.slow
def test_relora_resume_across_warm_start_and_resets_is_bit_identical(tmp_path):
    # Official timing: the switch follows update 3, merges follow updates 6 (and 9: past the end);
    # the checkpoint at 4 sits between them.
    cfg = _config("relora", "train.steps=8", "train.checkpoint_steps=4", "method.warm_start_steps=2",
                  "method.reset_every=3", "method.restart_warmup=1", "data.seq_len=32", "train.batch_size=4")
    train(cfg, tmp_path / "straight")
    assert _interrupted(cfg, tmp_path / "resumed", after=5)["resumed_from"] == 4
    a, b = _checkpoint(tmp_path / "straight", 8), _checkpoint(tmp_path / "resumed", 8)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state = ckpt.load_training_state(ckpt.list_checkpoints(tmp_path / "resumed")[0].path)
    assert state["method"]["steps_done"] == 3 and state["after_step_pending"]


@pytest.mark.slow
def test_relora_checkpoint_at_a_merge_step_holds_the_pre_merge_adapters(tmp_path):
    """As the official code saves before merging: the checkpoint at a merge step holds the trained
    adapters, the merge lands in W0 right after it, and no merge follows the last update; a run
    resumed from the merge-step checkpoint performs the pending merge first."""
    cfg = _config("relora", "train.steps=7", "train.checkpoint_steps=4,5", "method.reset_every=3",
                  "method.restart_warmup=1", "method.initial_a=kaiming", "data.seq_len=32", "train.batch_size=4")
    train(cfg, tmp_path / "straight")  # merges after updates 4 (point 3) and 7 (point 6, the last: none)
    at_merge, after_merge, final = (_checkpoint(tmp_path / "straight", s) for s in (4, 5, 7))
    scale = 32.0 / 32  # alpha / rank on the tiny preset
    for name in [k[: -len(".weight")] for k in at_merge if k.endswith("q_proj.weight")]:
        B, A, W0 = at_merge[f"{name}.B"], at_merge[f"{name}.A"], at_merge[f"{name}.weight"]
        assert B.abs().sum() > 0  # trained adapters, not the freshly drawn ones
        torch.testing.assert_close(after_merge[f"{name}.weight"], W0 + scale * (B @ A), rtol=0, atol=1e-6)
        assert final[f"{name}.B"].abs().sum() > 0  # the final checkpoint is not just-reset
    _interrupted(cfg, tmp_path / "resumed", after=4)
    resumed = _checkpoint(tmp_path / "resumed", 7)
    assert all(torch.equal(resumed[key], final[key]) for key in final)


# -- SLTrain ---------------------------------------------------------------------------------------


def test_sltrain_support_comes_from_the_seed_and_survives_save_load(tmp_path):
    model_a, _, _ = _build("sltrain", seed=0)
    model_again, _, _ = _build("sltrain", seed=0)
    model_b, _, _ = _build("sltrain", seed=1)
    index = lambda model: [m.sparse_index for m in _layers(model, SparsePlusLowRankLinear)]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(index(model_a), index(model_again)))
    assert not any(torch.equal(x, y) for x, y in zip(index(model_a), index(model_b)))
    assert all(x.dtype == torch.int32 for x in index(model_a))
    save_file(model_a.state_dict(), str(tmp_path / "model.safetensors"))
    model_b.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    assert all(torch.equal(x, y) for x, y in zip(index(model_a), index(model_b)))
    with torch.no_grad():
        assert torch.equal(model_a(_batch()), model_b(_batch()))


def test_sltrain_keeps_no_dense_weight_as_parameter_or_state():
    model, _, optimizer = _build("sltrain")
    _train_steps(model, optimizer, 1)
    for layer in _layers(model, SparsePlusLowRankLinear):
        dense = layer.out_features * layer.in_features
        for p in layer.parameters():
            assert p.numel() < dense / 2
            assert all(t.numel() < dense / 2 for t in optimizer.state[p].values())
        assert layer.sparse_values.numel() == int(0.03 * dense)


def test_sltrain_support_size_rounds_down_as_the_official_layer():
    # SpLoRaLinear: num_nonzeros = int(sp_ratio * total_elements). 0.03 · 128 · 352 = 1351.68.
    assert support_size(0.03, 128, 352) == 1351
    assert support_size(0.03, 768, 768) == 17694  # 130M attention: 17694.72
    model, _, _ = _build("sltrain")
    assert model.layers[0].mlp.up_proj.sparse_values.numel() == 1351


def test_sltrain_loads_a_checkpoint_whose_support_has_another_size(tmp_path):
    """Runs saved before the support followed int(·) hold round(δ·out·in) positions; the support
    is data, so loading takes its size from the checkpoint (the optimizer keeps its tensors)."""
    model, _, optimizer = _build("sltrain")
    layer = model.layers[0].mlp.up_proj
    state = model.state_dict()
    state["layers.0.mlp.up_proj.sparse_index"] = torch.arange(0, 1352 * 7, 7, dtype=torch.int32)
    state["layers.0.mlp.up_proj.sparse_values"] = torch.randn(1352)
    values = layer.sparse_values
    model.load_state_dict(state)
    assert layer.sparse_values is values and values.numel() == 1352
    check_param_groups(model, optimizer)
    x = torch.randn(2, 128)
    torch.testing.assert_close(layer(x), x @ layer.effective_weight().T, rtol=1e-5, atol=1e-5)


def test_sltrain_trainable_scaling_folds_tanh_of_a_scalar_into_the_product():
    model, _, optimizer = _build("sltrain", "method.trainable_scaling=true")
    layer = _layers(model, SparsePlusLowRankLinear)[0]
    with torch.no_grad():
        layer.B.normal_(0.0, 0.1)
    x = torch.randn(4, layer.in_features)
    sparse = torch.zeros(layer.out_features * layer.in_features).index_add(0, layer.sparse_index, layer.sparse_values.detach())
    expected = x @ (math.tanh(1.0) * layer.B @ layer.A + sparse.view(layer.out_features, layer.in_features)).T
    out = layer(x)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert layer.scaling.grad is not None and layer.scaling.grad.abs().item() > 0
    check_param_groups(model, optimizer)


# -- CoLA ------------------------------------------------------------------------------------------


def test_cola_has_no_dense_form():
    model, _, _ = _build("cola")
    assert all(layer.effective_weight() is None for layer in _layers(model, ColaLinear))
    with pytest.raises(NotDenseError):
        dense_state_dict(model)


def _cola_bottleneck(layer, x):
    """B·silu(A·x) written out: the official ColaLayer without bias."""
    return F.linear(F.silu(F.linear(x, layer.A)), layer.B)


def test_cola_350m_mlp_keeps_all_three_projections_gated_without_the_outer_silu():
    """cola_350m.json leaves only_lr_act at the class default (true): ColaMLP computes
    down(gate(x) · up(x)), each projection a rank-256 CoLA bottleneck."""
    cfg = build_config({}, ["model.preset=350m", "method.name=cola"])
    model_cfg = dataclasses.replace(get_preset("350m"), num_layers=1, vocab_size=VOCAB)
    model, _ = build_run_model(cfg, model_cfg, 0)
    mlp = model.layers[0].mlp
    assert isinstance(mlp, ColaMLP) and not mlp.outer_activation
    assert all(isinstance(getattr(mlp, n), ColaLinear) and getattr(mlp, n).rank == 256
               for n in ("gate_proj", "up_proj", "down_proj"))
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gate, up = _cola_bottleneck(mlp.gate_proj, x), _cola_bottleneck(mlp.up_proj, x)
        torch.testing.assert_close(mlp(x), _cola_bottleneck(mlp.down_proj, gate * up), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(mlp(x), _cola_bottleneck(mlp.down_proj, F.silu(gate) * up), atol=1e-4)
    # Parameters: every projection costs r·(d_in + d_out); 24 blocks, vocab 32000, untied head.
    per_block = sum(p.numel() for p in model.layers[0].parameters())
    attention, mlp_count = 4 * 256 * (1024 + 1024), 3 * 256 * (1024 + 2736)
    assert per_block == attention + mlp_count + 2 * 1024
    total = 2 * 32000 * 1024 + 1024 + 24 * per_block
    assert total == 185_222_144  # computed from cola_350m.json (hidden 1024, ffn 2736, rank 256)


def test_cola_60m_mlp_keeps_the_outer_silu():
    model, _, optimizer = _build("cola")
    check_param_groups(model, optimizer)
    mlp = model.layers[0].mlp
    assert isinstance(mlp, ColaMLP) and mlp.outer_activation
    x = torch.randn(3, 128)
    with torch.no_grad():
        gate, up = _cola_bottleneck(mlp.gate_proj, x), _cola_bottleneck(mlp.up_proj, x)
        torch.testing.assert_close(mlp(x), _cola_bottleneck(mlp.down_proj, F.silu(gate) * up), rtol=1e-5, atol=1e-6)
    assert len(_layers(model, ColaLinear)) == 2 * 7


def test_cola_weight_decay_reaches_every_parameter_as_torch_adamw_in_its_harness():
    model, _, optimizer = _build("cola")
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.01}
    gain = model.layers[0].input_layernorm.weight
    matrices, _, scoped = _build("cola", "optim.weight_decay_scope=matrices")
    no_decay = {id(p) for g in scoped.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    names = {id(p): n for n, p in matrices.named_parameters()}
    assert sorted(names[i] for i in no_decay) == sorted(n for n in names.values() if "norm" in n)
    check_param_groups(matrices, scoped)
    assert next(g for g in optimizer.param_groups if any(p is gain for p in g["params"]))["weight_decay"] == 0.01
