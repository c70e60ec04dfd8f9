"""Validation and preemption: a stop request does not wait for a long validation to finish.

A SLURM job gets its warning signal a fixed time before the kill; a validation over tens of
thousands of sequences can outlast it, and the job would then die without its requeue. So the
validation checks the stop flag before every batch, and the trainer checkpoints the step without
a val loss and stops. (Sharding the validation across DDP ranks: tests/train/test_distributed.py.)
"""

import dataclasses

import pytest
import torch

from helpers import assert_same_weights, final_weights  # tests/ is on sys.path
from rankscope.config import build_config
from rankscope.models import build_model, get_preset
from rankscope.train import checkpoint as ckpt
from rankscope.train import preemption
from rankscope.train import setup as train_setup
from rankscope.train.setup import evaluate_loss
from rankscope.train.trainer import train

STEPS = ["train.steps=6", "train.eval_every=3", "train.eval_batch_size=4"]  # 32 val sequences: 8 batches


@pytest.fixture(autouse=True)
def no_stop_left_over():
    preemption.clear_stop()
    yield
    preemption.clear_stop()


def _count_validation_batches(monkeypatch, stop_in_validation: int | None = None) -> list[int]:
    """Count the batches of each validation (the list grows by one per validation), and ask for a
    stop at the first batch of validation number `stop_in_validation` (0 = the initial one)."""
    counts: list[int] = []
    real_evaluate, real_losses = train_setup.evaluate_loss, train_setup.token_losses

    def evaluate(*args, **kwargs):
        counts.append(0)
        return real_evaluate(*args, **kwargs)

    def token_losses(model, batch):
        if counts[-1] == 0 and len(counts) - 1 == stop_in_validation:
            preemption.request_stop()
        counts[-1] += 1
        return real_losses(model, batch)

    from rankscope.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "evaluate_loss", evaluate)
    monkeypatch.setattr(train_setup, "token_losses", token_losses)
    return counts


def test_a_stoppable_validation_ends_at_its_next_batch_and_a_plain_one_ignores_the_flag():
    torch.manual_seed(0)
    model_cfg = dataclasses.replace(get_preset("tiny"), num_layers=1)
    model = build_model(model_cfg)
    sequences = torch.randint(0, model_cfg.vocab_size, (12, 17))
    plain = evaluate_loss(model, sequences, 4, torch.device("cpu"))
    preemption.request_stop()
    with pytest.raises(preemption.EvaluationStopped):
        evaluate_loss(model, sequences, 4, torch.device("cpu"), stoppable=True)
    assert model.training  # left as it was found
    assert evaluate_loss(model, sequences, 4, torch.device("cpu")) == plain  # analysis is never cut short


@pytest.fixture
def straight(tmp_path, tiny_overrides):
    cfg = build_config({}, tiny_overrides + STEPS)
    summary = train(cfg, tmp_path / "straight")
    return cfg, summary, final_weights(tmp_path / "straight")


def test_a_stop_during_a_validation_checkpoints_the_step_and_resumes_bit_for_bit(tmp_path, straight, monkeypatch):
    cfg, summary, weights = straight
    counts = _count_validation_batches(monkeypatch, stop_in_validation=1)  # the validation after step 3
    with pytest.raises(preemption.RunPreempted) as stopped:
        train(cfg, tmp_path / "stopped")
    assert stopped.value.step == 3
    assert counts == [8, 1]  # the initial validation in full, the step-3 one cut after its first batch
    [checkpoint] = ckpt.list_checkpoints(tmp_path / "stopped", include_preemption=True)
    assert checkpoint.step == 3 and checkpoint.meta["preemption"] is True
    assert checkpoint.meta["val_loss"] is None  # no val loss from a validation cut short

    preemption.clear_stop()
    resumed = train(cfg, tmp_path / "stopped")
    assert resumed["resumed_from"] == 3
    assert_same_weights(weights, final_weights(tmp_path / "stopped"))
    assert resumed["val_loss"] == summary["val_loss"]


def test_a_stop_during_the_initial_validation_stops_before_training(tmp_path, straight, monkeypatch):
    cfg, summary, weights = straight
    counts = _count_validation_batches(monkeypatch, stop_in_validation=0)
    with pytest.raises(preemption.RunPreempted) as stopped:
        train(cfg, tmp_path / "stopped")
    assert stopped.value.step == 0 and counts == [1]
    assert ckpt.list_checkpoints(tmp_path / "stopped", include_preemption=True) == []
    preemption.clear_stop()
    resumed = train(cfg, tmp_path / "stopped")
    assert resumed["resumed_from"] == 0 and resumed["initial_val_loss"] == summary["initial_val_loss"]
    assert_same_weights(weights, final_weights(tmp_path / "stopped"))


def test_a_stop_during_the_final_validation_keeps_the_final_checkpoint_and_validates_it_on_resume(
        tmp_path, straight, monkeypatch):
    cfg, summary, weights = straight
    counts = _count_validation_batches(monkeypatch, stop_in_validation=2)  # the one after step 6
    with pytest.raises(preemption.RunPreempted) as stopped:
        train(cfg, tmp_path / "stopped")
    assert stopped.value.step == 6 and counts == [8, 8, 1, 0]  # the retry at the end stops at once
    assert not (tmp_path / "stopped" / "summary.json").exists()
    assert [c.step for c in ckpt.list_checkpoints(tmp_path / "stopped")] == [6]
    preemption.clear_stop()
    resumed = train(cfg, tmp_path / "stopped")
    assert resumed["resumed_from"] == 6 and resumed["val_loss"] == summary["val_loss"]
    assert_same_weights(weights, final_weights(tmp_path / "stopped"))
