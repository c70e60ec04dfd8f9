"""The factorized methods lowrank, lora, relora, sltrain and cola: settings, parameterization,
optimizer groups and each method's own mechanics (ReLoRA's merges, pruning and jagged LR,
SLTrain's fixed support, LoRA's frozen W0, CoLA's ungated MLP)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from rankscope.config import build_config
from rankscope.errors import ConfigError
from rankscope.methods import get
from rankscope.methods.base import ResolvedOptim, check_param_groups
from rankscope.methods.cola import UngatedColaMLP
from rankscope.models import NotDenseError, build_model, dense_state_dict, get_preset, token_losses
from rankscope.nn import ColaLinear, LoRALinear, LowRankLinear, SparsePlusLowRankLinear
from rankscope.optim.schedules import cosine_with_warmup
from rankscope.train import checkpoint as ckpt
from rankscope.train import trainer as trainer_module
from rankscope.train.setup import build_method, build_run_model, resolve_optim
from rankscope.train.trainer import train

from conftest import TINY_RUN  # tests/ is on sys.path (rootdir conftest, no __init__.py)

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
        assert (s.reset_every, s.restart_warmup, s.alpha) == (every, 100, 32.0)
        assert (s.prune_ratio, s.prune_mode, s.warm_start_steps) == (0.999, "random", 0)
    assert [relora.optim_defaults(p).lr for p in ("60m", "130m", "350m")] == [1e-3, 1e-3, 5e-4]

    sltrain = get("sltrain")
    for preset, alpha in {"60m": 32.0, "130m": 16.0, "350m": 16.0, "1b": 8.0}.items():
        s = sltrain.default_settings(preset, get_preset(preset))
        assert (s.alpha, s.density) == (alpha, 0.03)
        assert sltrain.optim_defaults(preset).lr == 3e-3

    cola = get("cola")
    for preset, lr in {"60m": 6e-3, "130m": 3e-3, "350m": 3e-3, "1b": 2e-3}.items():
        defaults = cola.optim_defaults(preset)
        assert (defaults.lr, defaults.weight_decay, defaults.grad_clip) == (lr, 0.01, 0.5)
    gates = {p: cola.default_settings(p, get_preset(p)).mlp_gate for p in ("tiny", "60m", "130m", "350m", "1b")}
    assert gates == {"tiny": True, "60m": True, "130m": True, "350m": False, "1b": False}

    for name in ("lowrank", "lora"):
        assert get(name).optim_defaults("60m").lr == 1e-3
        assert get(name).default_settings("60m", get_preset("60m")).targets == [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
        ]


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
        ("sltrain", ["method.density=0"], "density"),
        ("sltrain", ["method.density=1.5"], "density"),
        ("sltrain", ["method.density=1e-6"], "density"),
        ("cola", ["method.activation=tanh"], "activation"),
        ("cola", ["method.mlp_gate=false", "method.targets=q_proj,down_proj"], "mlp_gate"),
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


def test_relora_merge_leaves_the_logits_unchanged_and_restarts_the_adapters():
    model, method, optimizer = _build("relora", "method.reset_every=2", "method.restart_warmup=1")
    _train_steps(model, optimizer, 2)  # no hook yet: B is non-zero now
    layers = _layers(model)
    merged = [layer.effective_weight().detach().clone() for layer in layers]
    old_A = [layer.A.detach().clone() for layer in layers]
    ids = _batch(99)
    with torch.no_grad():
        before = model(ids)
        method.after_step(1, model, optimizer)  # not a reset step: nothing happens
        assert all(torch.equal(layer.A, a) for layer, a in zip(layers, old_A))
        method.after_step(2, model, optimizer)
        after = model(ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for layer, weight, a in zip(layers, merged, old_A):
        torch.testing.assert_close(layer.weight, weight, rtol=0, atol=1e-7)
        assert torch.count_nonzero(layer.B) == 0
        assert not torch.equal(layer.A, a)


def test_relora_prunes_the_adapter_state_at_a_reset_only():
    model, method, optimizer = _build("relora", "method.reset_every=2", "method.restart_warmup=1")
    _train_steps(model, optimizer, 2)
    embed_state = {k: v.clone() for k, v in optimizer.state[model.embed_tokens.weight].items()}
    adapters = [p for layer in _layers(model) for p in (layer.A, layer.B)]
    method.after_step(2, model, optimizer)
    for key in ("exp_avg", "exp_avg_sq"):
        kept = sum(int(torch.count_nonzero(optimizer.state[p][key])) for p in adapters)
        total = sum(optimizer.state[p][key].numel() for p in adapters)
        assert 0 < kept < 0.005 * total, key  # random pruning of 99.9%: ~0.1% survive
    for key, value in embed_state.items():
        assert torch.equal(optimizer.state[model.embed_tokens.weight][key], value), key


def test_relora_magnitude_pruning_keeps_the_largest_moments():
    model, method, optimizer = _build("relora", "method.reset_every=2", "method.restart_warmup=1", "method.prune_mode=magnitude",
                                      "method.prune_ratio=0.75")
    _train_steps(model, optimizer, 2)
    layer = _layers(model)[0]
    old = optimizer.state[layer.B]["exp_avg"].clone()
    method.after_step(2, model, optimizer)
    new = optimizer.state[layer.B]["exp_avg"]
    kept = new != 0
    assert torch.equal(new[kept], old[kept])
    assert old[~kept].abs().max() <= old[kept].abs().min()
    assert kept.sum() <= 0.25 * old.numel() + 1


def test_relora_reset_randomness_ignores_the_global_rng():
    results = []
    for global_seed in (1, 2):
        model, method, optimizer = _build("relora", "method.reset_every=2", "method.restart_warmup=1")
        _train_steps(model, optimizer, 2)
        torch.manual_seed(global_seed)
        method.after_step(2, model, optimizer)
        results.append((_layers(model)[0].A.detach().clone(), optimizer.state[_layers(model)[0].A]["exp_avg"].clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def _optim(total: int = 100, warmup: int = 10) -> ResolvedOptim:
    return ResolvedOptim(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, grad_clip=1.0,
                         total_steps=total, warmup_steps=warmup, min_lr_ratio=0.1)


def test_relora_lr_is_the_jagged_cosine():
    # Update k (1-based) gets the multiplier; resets happen after updates 20, 40, 60, 80.
    _, method, _ = _build("relora", "method.reset_every=20", "method.restart_warmup=5")
    optim = _optim()
    envelope = lambda step: cosine_with_warmup(step, 100, 10, 0.1)  # noqa: E731
    for k in range(1, 101):
        reset = (k - 1) // 20 * 20
        if reset > 0 and k - reset < 5:  # re-warm: 1/5, 2/5, ... of the envelope at reset + 5
            expected = (k - reset) / 5 * envelope(reset + 5)
        else:
            expected = envelope(k)
        assert method.lr_multiplier(k, optim) == pytest.approx(expected, abs=1e-12), k
    assert method.lr_multiplier(20, optim) == envelope(20)  # the update before the merge keeps its lr
    assert method.lr_multiplier(21, optim) == pytest.approx(envelope(25) / 5)
    assert method.lr_multiplier(3, optim) == pytest.approx(3 / 10)  # the initial warmup is untouched


def test_relora_warm_start_shifts_the_resets_and_rewarms_at_the_switch():
    _, method, _ = _build("relora", "method.reset_every=20", "method.restart_warmup=5", "method.warm_start_steps=15")
    optim = _optim()
    envelope = lambda step: cosine_with_warmup(step, 100, 10, 0.1)  # noqa: E731
    assert [method.is_reset_step(s) for s in (15, 20, 35, 55, 40)] == [True, False, True, True, False]
    assert method.lr_multiplier(15, optim) == envelope(15)
    assert method.lr_multiplier(16, optim) == pytest.approx(envelope(20) / 5)
    assert method.lr_multiplier(20, optim) == envelope(20)
    assert method.lr_multiplier(21, optim) == envelope(21)  # no reset at reset_every itself
    assert method.lr_multiplier(36, optim) == pytest.approx(envelope(40) / 5)


def test_relora_warm_start_trains_w0_then_freezes_it_and_drops_its_state():
    model, method, optimizer = _build("relora", "method.warm_start_steps=2", "method.reset_every=3",
                                      "method.restart_warmup=1")
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


@pytest.mark.slow
def test_relora_resume_across_warm_start_and_resets_is_bit_identical(tmp_path, monkeypatch):
    # Resets at 2 (the switch), 5 and 8; the checkpoint at 4 sits between them.
    cfg = _config("relora", "train.steps=8", "train.checkpoint_steps=4", "method.warm_start_steps=2",
                  "method.reset_every=3", "method.restart_warmup=1", "data.seq_len=32", "train.batch_size=4")
    train(cfg, tmp_path / "straight")
    original_update = trainer_module.ProgressLog.update

    def interrupt(self, step, record, tps):
        if step == 6:
            raise KeyboardInterrupt
        return original_update(self, step, record, tps)

    monkeypatch.setattr(trainer_module.ProgressLog, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed")
    monkeypatch.setattr(trainer_module.ProgressLog, "update", original_update)
    assert train(cfg, tmp_path / "resumed")["resumed_from"] == 4
    final = lambda run: load_file(str(ckpt.list_checkpoints(run)[-1].path / "model.safetensors"))  # noqa: E731
    a, b = final(tmp_path / "straight"), final(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state = ckpt.load_training_state(ckpt.list_checkpoints(tmp_path / "resumed")[0].path)
    assert state["method"]["steps_done"] == 4


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
        assert layer.sparse_values.numel() == round(0.03 * dense)


# -- CoLA ------------------------------------------------------------------------------------------


def test_cola_has_no_dense_form():
    model, _, _ = _build("cola")
    assert all(layer.effective_weight() is None for layer in _layers(model, ColaLinear))
    with pytest.raises(NotDenseError):
        dense_state_dict(model)


def test_cola_without_mlp_gate_drops_the_gate():
    model, _, optimizer = _build("cola", "method.mlp_gate=false")
    check_param_groups(model, optimizer)
    assert len(_layers(model, ColaLinear)) == 2 * 6
    assert not any("gate_proj" in key for key in model.state_dict())
    mlp = model.layers[0].mlp
    assert isinstance(mlp, UngatedColaMLP)
    x = torch.randn(3, 128)
    up = mlp.up_proj
    with torch.no_grad():
        inner = F.linear(F.silu(F.linear(x, up.A)), up.B)  # the σ inside the bottleneck
        expected = F.linear(F.silu(F.linear(inner, mlp.down_proj.A)), mlp.down_proj.B)
        torch.testing.assert_close(mlp(x), expected)
    gated, _, _ = _build("cola")
    assert isinstance(gated.layers[0].mlp.gate_proj, ColaLinear)
