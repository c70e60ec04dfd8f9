"""The frozen-blocks control: after training, every targeted block matrix is bit-identical to its
seeded init and everything else (embeddings, head, norms) has moved; it is registered as a control,
not a method."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY_RUN
from rankscope import methods
from rankscope.config import build_config
from rankscope.errors import ConfigError
from rankscope.models import iter_target_linears
from rankscope.train import load_run_model
from rankscope.train.setup import build_run_model, check_method_settings
from rankscope.train.trainer import train


def test_the_control_trains_no_block_matrix_and_trains_everything_else(tmp_path):
    cfg = build_config({}, TINY_RUN + ["method.name=frozen", "train.steps=6", "optim.lr=0.01"])
    summary = train(cfg, tmp_path / "run")
    loaded = load_run_model(tmp_path / "run")
    initial, _ = build_run_model(cfg, loaded.model_config)  # the same seed: the run's init
    start, end = initial.state_dict(), loaded.model.state_dict()
    blocks = {f"{name}.weight" for name, *_ in iter_target_linears(loaded.model)}
    assert len(blocks) == 2 * 7  # q, k, v, o, gate, up, down of both layers
    for key in start:
        if key in blocks:
            assert torch.equal(start[key], end[key]), f"{key} moved"
        else:
            assert not torch.equal(start[key], end[key]), f"{key} did not train"
    assert summary["trainable_params"] == sum(v.numel() for k, v in end.items() if k not in blocks)
    assert summary["val_loss"] < summary["initial_val_loss"]


def test_frozen_is_a_control_not_a_method():
    assert methods.is_control("frozen") and "frozen" in methods.control_names()
    assert "frozen" not in methods.method_names() and "full" in methods.method_names()


def test_a_bad_target_is_refused_before_training():
    with pytest.raises(ConfigError, match="method.targets entry 'qproj' is not a projection"):
        check_method_settings(build_config({}, ["method.name=frozen", "method.targets=[qproj]"]))
