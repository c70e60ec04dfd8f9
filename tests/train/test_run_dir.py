"""Run folders: --overwrite removes only the run's own files, a checkpoint resumes only under its
own config, and crash artifacts of the side files never block a resume."""

import json
import logging
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rankscope.config import build_config
from rankscope.errors import CheckpointError, ConfigError
from rankscope.train import checkpoint as ckpt
from rankscope.train.run_dir import MARKER_FILE, is_run_dir
from rankscope.train.trainer import train


def _cfg(tiny_overrides, *extra):
    return build_config({}, tiny_overrides + ["train.steps=4", "train.checkpoint_steps=2", *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run with checkpoints at 2 and 4, copied by each test that changes it."""
    from helpers import TINY_RUN

    run = tmp_path_factory.mktemp("finished") / "run"
    train(build_config({}, TINY_RUN + ["train.steps=4", "train.checkpoint_steps=2"]), run)
    return run


def _copy(finished, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


def _metrics_steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run, step):
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def test_overwrite_removes_only_the_runs_own_files(finished, tmp_path, tiny_overrides):
    run = _copy(finished, tmp_path)
    (run / "notes.txt").write_text("keep me")
    (run / "plots").mkdir()
    (run / "plots" / "loss.png").write_bytes(b"png")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "result.json").write_text("{}")
    (run / "eval").symlink_to(outside, target_is_directory=True)  # a link must be removed, not followed

    summary = train(_cfg(tiny_overrides, "optim.lr=2e-3"), run, overwrite=True)

    assert summary["resumed_from"] == 0
    assert (run / "notes.txt").read_text() == "keep me" and (run / "plots" / "loss.png").read_bytes() == b"png"
    assert (outside / "result.json").read_text() == "{}"
    assert not (run / "eval").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 2e-3
    assert all(c.meta["config"]["optim"]["lr"] == 2e-3 for c in ckpt.list_checkpoints(run))
    assert _metrics_steps(run)[0] == 0 and _metrics_steps(run).count(0) == 1


def test_a_changed_config_without_config_yaml_is_refused_and_overwrite_starts_from_zero(finished, tmp_path, tiny_overrides):
    """Issue case 5: config.yaml deleted, new lr: the old checkpoints must not be resumed under it."""
    run = _copy(finished, tmp_path)
    (run / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"optim.lr: None in checkpoint step_000004 vs 0.002 now"):
        train(_cfg(tiny_overrides, "optim.lr=2e-3"), run)
    summary = train(_cfg(tiny_overrides, "optim.lr=2e-3"), run, overwrite=True)
    assert summary["resumed_from"] == 0
    fresh = train(_cfg(tiny_overrides, "optim.lr=2e-3"), tmp_path / "fresh")
    assert summary["val_loss"] == fresh["val_loss"]  # the same as a run that never saw the old checkpoints
    for key, tensor in _weights(tmp_path / "fresh", 4).items():
        assert torch.equal(tensor, _weights(run, 4)[key]), key


def test_the_same_config_without_config_yaml_resumes(finished, tmp_path, tiny_overrides):
    run = _copy(finished, tmp_path)
    (run / "config.yaml").unlink()
    (run / "summary.json").unlink()
    summary = train(_cfg(tiny_overrides), run)
    assert summary["resumed_from"] == 4 and (run / "config.yaml").is_file()


def test_a_malformed_config_yaml_is_rewritten_from_the_checkpoints(finished, tmp_path, tiny_overrides, caplog):
    run = _copy(finished, tmp_path)
    (run / "config.yaml").write_text("model: {preset: tiny\n  data: [")  # cut off mid-write
    (run / "summary.json").unlink()
    summary = train(_cfg(tiny_overrides), run)
    assert summary["resumed_from"] == 4
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 4


def test_a_cut_off_last_metrics_line_is_dropped_with_a_warning(finished, tmp_path, tiny_overrides, caplog):
    run = _copy(finished, tmp_path)
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "step_000004")
    with open(run / "metrics.jsonl", "ab") as handle:
        handle.write(b'{"step": 5, "tokens": 25')  # a crash while appending
    with caplog.at_level(logging.WARNING, logger="rankscope.train"):
        summary = train(_cfg(tiny_overrides), run)
    assert "metrics.jsonl: dropped its last line" in caplog.text
    assert summary["resumed_from"] == 2
    steps = _metrics_steps(run)
    assert steps == sorted(set(steps)) and steps[-1] == 4


def test_a_folder_holding_only_a_lock_file_counts_as_empty(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".rankscope-lock").write_text('{"pid": 999999999, "host": "gone", "started": 0}')
    train(_cfg(tiny_overrides, "train.steps=2", "train.checkpoint_steps=1"), run)
    assert (run / MARKER_FILE).is_file() and not (run / ".rankscope-lock").exists()


def test_a_run_written_before_markers_and_hashes_is_adopted_and_resumed(finished, tmp_path, tiny_overrides):
    run = _copy(finished, tmp_path)
    (run / MARKER_FILE).unlink()
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "step_000004")
    meta_path = run / "checkpoints" / "step_000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"] = {name: entry["size"] for name, entry in meta["files"].items()}
    for key in ("hash_algorithm", "config"):
        meta.pop(key)
    meta_path.write_text(json.dumps(meta))
    assert is_run_dir(run)
    summary = train(_cfg(tiny_overrides), run)
    assert summary["resumed_from"] == 2 and (run / MARKER_FILE).is_file()
    for key, tensor in _weights(finished, 4).items():
        assert torch.equal(tensor, _weights(run, 4)[key]), key


def test_damaged_side_file_errors_name_the_file(finished, tmp_path, tiny_overrides):
    run = _copy(finished, tmp_path)
    (run / "initial_eval.json").write_text('{"loss": 9.0}')  # valid JSON, not the record
    (run / "summary.json").unlink()
    with pytest.raises(CheckpointError, match=r"initial_eval.json is damaged \(not the expected record\); delete it"):
        train(_cfg(tiny_overrides), run)


def test_a_start_again_from_step_zero_logs_each_step_once(tmp_path, tiny_overrides):
    """A crash before the first checkpoint: the rerun starts from 0 and must not log step 0 twice."""
    from helpers import train_interrupted

    cfg = _cfg(tiny_overrides)
    train_interrupted(cfg, tmp_path / "run", after_step=1)
    assert _metrics_steps(tmp_path / "run") == [0] and not ckpt.list_checkpoints(tmp_path / "run")
    train(cfg, tmp_path / "run")
    steps = _metrics_steps(tmp_path / "run")
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 4


def test_a_run_recorded_before_a_setting_existed_resumes_under_its_default(tmp_path, tiny_overrides):
    """A run of an older rankscope lacks the settings added since; they take their defaults, which keep
    the behaviour it was trained with, so it resumes. Asking for another value is a different config."""
    run = tmp_path / "run"
    train(_cfg(tiny_overrides, "method.name=lowrank"), run)
    shutil.rmtree(run / "checkpoints" / "step_000004")
    (run / "summary.json").unlink()
    added = ("refactor_every", "reset_optimizer", "recovery_steps", "recovery_floor")
    meta_path = run / "checkpoints" / "step_000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in added:
        meta["config"]["method"].pop(key)
    meta_path.write_text(json.dumps(meta))
    config = yaml.safe_load((run / "config.yaml").read_text())
    for key in added:
        config["method"].pop(key)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="method.refactor_every: 0 in checkpoint step_000002 vs 100 now"):
        train(_cfg(tiny_overrides, "method.name=lowrank", "method.refactor_every=100"), run)
    assert train(_cfg(tiny_overrides, "method.name=lowrank"), run)["resumed_from"] == 2
