"""A stop request checkpoints the current step, which analysis never sees, and resumes bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import at_step  # tests/ is on sys.path
from rankscope.config import build_config
from rankscope.train import checkpoint as ckpt
from rankscope.train import preemption
from rankscope.train.trainer import train


@pytest.fixture(autouse=True)
def no_stop_left_over():
    preemption.clear_stop()
    yield
    preemption.clear_stop()


def _stop_at(stop_step):
    """A stop request while update `stop_step` runs (what a signal handler does)."""
    return at_step(stop_step, preemption.request_stop)


def _weights(run_dir):
    return load_file(str(ckpt.list_checkpoints(run_dir)[-1].path / "model.safetensors"))


# Stopped at step 7: GaLore just past a projector refresh (step 5); ReLoRA just after a merge (with
# the official schedule a merge follows update reset_every + 1). The method's periodic work runs
# before the stop is checked, so the preemption checkpoint holds it and a resume must not redo it.
@pytest.mark.parametrize("method", [
    ["method.name=galore", "method.update_proj_gap=5"],
    ["method.name=relora", "method.reset_every=6", "method.restart_warmup=2"],
], ids=["galore", "relora"])
def test_a_stopped_run_checkpoints_its_step_and_resumes_bit_for_bit(tmp_path, tiny_overrides, method):
    cfg = build_config({}, tiny_overrides + ["train.steps=12", "train.checkpoint_steps=4", *method])
    train(cfg, tmp_path / "straight")

    with _stop_at(7), pytest.raises(preemption.RunPreempted) as stopped:
        train(cfg, tmp_path / "stopped")
    assert stopped.value.step == 7
    # The step-7 checkpoint is there for resuming, but not a checkpoint of the run's schedule.
    assert [c.step for c in ckpt.list_checkpoints(tmp_path / "stopped")] == [4]
    resumable = ckpt.list_checkpoints(tmp_path / "stopped", include_preemption=True)
    assert [c.step for c in resumable] == [4, 7] and resumable[-1].meta["preemption"] is True
    assert not (tmp_path / "stopped" / "summary.json").exists()

    preemption.clear_stop()
    summary = train(cfg, tmp_path / "stopped")
    assert summary["resumed_from"] == 7
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "stopped")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Once a regular checkpoint follows, the preemption checkpoint is gone.
    assert [c.step for c in ckpt.list_checkpoints(tmp_path / "stopped", include_preemption=True)] == [4, 12]
    steps = [json.loads(line)["step"] for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_a_stop_on_a_scheduled_checkpoint_step_adds_no_extra_checkpoint(tmp_path, tiny_overrides):
    cfg = build_config({}, tiny_overrides + ["train.steps=6", "train.checkpoint_steps=3"])
    with _stop_at(3), pytest.raises(preemption.RunPreempted):
        train(cfg, tmp_path / "run")
    infos = ckpt.list_checkpoints(tmp_path / "run", include_preemption=True)
    assert [c.step for c in infos] == [3] and "preemption" not in infos[0].meta


def test_a_stop_requested_during_the_last_step_lets_the_run_finish(tmp_path, tiny_overrides):
    cfg = build_config({}, tiny_overrides + ["train.steps=4"])
    with _stop_at(4):
        summary = train(cfg, tmp_path / "run")
    assert summary["steps"] == 4 and (tmp_path / "run" / "summary.json").is_file()
