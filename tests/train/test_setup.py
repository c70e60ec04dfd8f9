"""Loading a run for analysis, eval and export: damaged checkpoints are never used silently."""

import logging
import shutil

import pytest
import torch

from rankscope.config import build_config
from rankscope.errors import CheckpointError
from rankscope.train import checkpoint as ckpt
from rankscope.train.setup import load_run_model, read_run_config
from rankscope.train.trainer import train


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from helpers import TINY_RUN

    run = tmp_path_factory.mktemp("finished") / "run"
    train(build_config({}, TINY_RUN + ["train.steps=4", "train.checkpoint_steps=2"]), run)
    return run


@pytest.fixture
def damaged_latest(finished, tmp_path):
    """A copy of the run whose step-4 weights have one flipped byte (same size)."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    weights = run / "checkpoints" / "step_000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x10  # inside the last tensor's data
    weights.write_bytes(bytes(data))
    return run


def test_the_latest_intact_checkpoint_is_loaded_with_a_warning(damaged_latest, finished, caplog):
    with caplog.at_level(logging.WARNING, logger="rankscope.train"):
        loaded = load_run_model(damaged_latest)
    assert loaded.step == 2
    assert "step_000004 is damaged (model.safetensors does not match its content hash" in caplog.text
    reference = load_run_model(finished, step=2).model.state_dict()
    for key, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, reference[key]), key


def test_a_damaged_checkpoint_asked_for_by_step_is_an_error(damaged_latest):
    with pytest.raises(CheckpointError, match=r"step_000004 is damaged: .*ask for another step"):
        load_run_model(damaged_latest, step=4)


def test_analysis_skips_a_damaged_checkpoint(damaged_latest, caplog):
    from rankscope.analysis.pipeline import inspect_run

    with caplog.at_level(logging.WARNING, logger="rankscope.train"):
        info = inspect_run(damaged_latest)
    assert info.steps == [2]
    assert "step_000004 is damaged" in caplog.text


def test_read_run_config_falls_back_to_the_checkpoints_record(finished, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "config.yaml").write_bytes(b"\xff\xfe not yaml")
    with caplog.at_level(logging.WARNING, logger="rankscope.train"):
        cfg = read_run_config(run)
    assert cfg.train.steps == 4 and "config.yaml is missing or damaged" in caplog.text
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(Exception, match="not UTF-8"):
        read_run_config(run)
    assert ckpt.list_checkpoints(run) == []
