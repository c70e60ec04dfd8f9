"""One table-driven contract test over every registered method (rankscope.methods.names()).

Every method must: build on the tiny model, produce logits of the right shape, put every
trainable parameter in exactly one optimizer group, lower the validation loss within 50 steps
with its default settings, give identical logits after save/load, resume bit-identically, have
`effective_weight()` reproduce each parameterized layer's output, and refuse bad settings with a
ConfigError before any training.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from helpers import (  # tests/ is on sys.path (rootdir conftest, no __init__.py)
    TINY_RUN,
    assert_same_weights,
    final_weights,
    train_interrupted,
)
from rankscope import methods
from rankscope.config import build_config
from rankscope.errors import ConfigError
from rankscope.methods.base import Method, OptimDefaults, check_param_groups
from rankscope.models import get_preset
from rankscope.nn import ParameterizedLinear
from rankscope.train import load_run_model
from rankscope.train import trainer as trainer_module
from rankscope.train.setup import build_run_model, build_training_model, resolve_optim
from rankscope.train.trainer import train

ALL_METHODS = methods.names()
PRESETS = ("tiny", "20m", "60m", "130m", "350m", "1b", "7b")


# Training runs use half the tiny run's batch and sequence length: 50 steps of 128 tokens already
# separate a method that learns from one that does not (the initial loss is ln(8192) ~ 9).
SMALL_BATCH = ["data.seq_len=32", "train.batch_size=4"]


def _config(name: str, *extra: str):
    return build_config({}, TINY_RUN + [f"method.name={name}", *extra])


def _small_model(name: str, vocab: int = 256):
    """The run's model on a small vocabulary (no data needed), with its method and optimizer."""
    cfg = _config(name)
    model_cfg = dataclasses.replace(get_preset("tiny"), num_layers=2, vocab_size=vocab)
    model, method = build_run_model(cfg, model_cfg)
    optim = resolve_optim(cfg, type(method))
    return cfg, model, method, method.build_optimizer(model, optim)


def _setting_names(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(methods.get(name).Settings)}


@pytest.mark.parametrize("name", ALL_METHODS)
def test_method_declares_the_contract(name):
    cls = methods.get(name)
    assert issubclass(cls, Method)
    assert cls.name == name
    assert cls.description and "\n" not in cls.description
    for preset in PRESETS:
        settings = cls.default_settings(preset, get_preset(preset))
        assert isinstance(settings, cls.Settings)
        defaults = cls.optim_defaults(preset)
        assert isinstance(defaults, OptimDefaults) and defaults.lr > 0 and defaults.grad_clip >= 0


@pytest.mark.parametrize("name", ALL_METHODS)
def test_builds_with_full_param_group_coverage_and_right_shapes(name):
    _, model, _, optimizer = _small_model(name)
    check_param_groups(model, optimizer)  # raises unless every trainable tensor sits in one group
    ids = torch.randint(0, 256, (3, 10))
    assert model(ids).shape == (3, 10, 256)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_effective_weight_reproduces_each_layer(name):
    _, model, _, _ = _small_model(name)
    model.eval()  # adapter dropout (LoRA, ReLoRA) acts in training only; analysis runs in eval mode
    torch.manual_seed(1)
    layers = [module for module in model.modules() if isinstance(module, ParameterizedLinear)]
    if not layers:
        # A method that trains the dense model (full, galore, fira, ...): every targeted linear must
        # still be a plain nn.Linear, whose dense weight is its own.
        from rankscope.models import iter_target_linears

        targets = [module for *_, module in iter_target_linears(model)]
        assert targets and all(type(module) is torch.nn.Linear for module in targets), name
        return
    checked = 0
    for module in layers:
        # Random values everywhere, so zero-initialised adapters do not hide a wrong formula.
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, 0.1)
        weight = module.effective_weight()
        if weight is None:
            continue  # no dense form (CoLA)
        assert weight.shape == (module.out_features, module.in_features)
        x = torch.randn(4, module.in_features)
        with torch.no_grad():
            torch.testing.assert_close(module(x), x @ weight.T, rtol=1e-5, atol=1e-5)
        checked += 1
    if checked == 0:
        # No dense form anywhere (CoLA's B·σ(A·x)): the documented answer, and export refuses it.
        from rankscope.models import NotDenseError, dense_state_dict

        with pytest.raises(NotDenseError):
            dense_state_dict(model)
        return
    assert checked == len(layers), f"{name}: only {checked} of {len(layers)} layers have a dense form"


@pytest.mark.parametrize("name", ALL_METHODS)
def test_bad_settings_fail_before_training(name, tmp_path):
    with pytest.raises(ConfigError, match="nonexistent"):
        _config(name, "method.nonexistent=1")
    bad = []
    if "rank" in _setting_names(name):
        bad.append("method.rank=128")  # = hidden_size of the tiny model: not low rank
    if "density" in _setting_names(name):
        bad += ["method.density=0", "method.density=1.5"]
    for override in bad:
        run_dir = tmp_path / override.replace("=", "_")
        with pytest.raises(ConfigError):
            train(_config(name, override, "train.steps=2"), run_dir)
        assert not (run_dir / "metrics.jsonl").exists(), override


@pytest.fixture(scope="module", params=ALL_METHODS)
def trained(request, tmp_path_factory):
    """A 50-step run of each method with its default settings, and its in-memory model."""
    name = request.param
    run_dir = tmp_path_factory.mktemp(f"contract-{name}") / "run"
    captured = {}

    def capture(*args, **kwargs):
        model, method = build_training_model(*args, **kwargs)
        captured["model"] = model
        return model, method

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "build_training_model", capture)
        summary = train(_config(name, "train.steps=50", *SMALL_BATCH), run_dir)
    return name, run_dir, summary, captured["model"]


@pytest.mark.slow
def test_loss_falls_within_50_steps(trained):
    name, run_dir, summary, _ = trained
    assert summary["val_loss"] < summary["initial_val_loss"] - 0.5, name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert train_losses[-1] < train_losses[0], name


@pytest.mark.slow
def test_save_load_gives_identical_logits(trained):
    name, run_dir, _, model = trained
    loaded = load_run_model(run_dir)
    assert loaded.step == 50
    ids = torch.randint(0, loaded.model_config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), loaded.model(ids)), name


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_METHODS)
def test_resume_is_bit_identical(name, tmp_path):
    cfg = _config(name, "train.steps=8", "train.checkpoint_steps=4", *SMALL_BATCH)
    train(cfg, tmp_path / "straight")

    train_interrupted(cfg, tmp_path / "resumed", after_step=5)
    summary = train(cfg, tmp_path / "resumed")
    assert summary["resumed_from"] == 4
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"), name)
