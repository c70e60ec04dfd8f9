import json
import logging
import shutil

import pytest
import torch

from helpers import (  # tests/ is on sys.path
    assert_same_weights,
    final_weights,
    train_interrupted,
)
from rankscope.config import build_config
from rankscope.errors import ConfigError
from rankscope.train import checkpoint as ckpt
from rankscope.train import trainer as trainer_module
from rankscope.train.trainer import NonFiniteLossError, train


def _cfg(tiny_overrides, *extra):
    return build_config({}, tiny_overrides + list(extra))




def test_training_lowers_validation_loss_and_writes_the_run(tmp_path, tiny_overrides):
    cfg = _cfg(tiny_overrides, "train.steps=40", "optim.lr=3e-3", "train.checkpoint_steps=20")
    summary = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    assert summary["val_loss"] < summary["initial_val_loss"] - 0.5
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "val_loss" in records[0]
    assert {"step", "tokens", "loss", "lr", "grad_norm", "step_time"} <= set(records[-1])
    assert records[-1]["val_loss"] == pytest.approx(summary["val_loss"])
    assert [c.step for c in ckpt.list_checkpoints(run)] == [20, 40]
    for key in ("val_loss", "val_ppl", "tokens", "steps", "params", "wall_time"):
        assert key in summary
    state = ckpt.load_training_state(ckpt.list_checkpoints(run)[0].path)  # weights_only=True
    assert state["step"] == 20


def test_resume_is_bit_identical(tmp_path, tiny_overrides):
    cfg = _cfg(tiny_overrides, "train.steps=16", "train.checkpoint_steps=6")
    train(cfg, tmp_path / "straight")

    train_interrupted(cfg, tmp_path / "resumed", after_step=9)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path / "resumed")] == [6]
    summary = train(cfg, tmp_path / "resumed")
    assert summary["resumed_from"] == 6
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # the log has each step once after the resume


def test_finished_run_is_not_retrained(tmp_path, tiny_overrides):
    cfg = _cfg(tiny_overrides, "train.steps=4")
    first = train(cfg, tmp_path / "r")
    again = train(cfg, tmp_path / "r")
    assert again == first


def test_a_run_dir_of_another_config_is_refused(tmp_path, tiny_overrides):
    train(_cfg(tiny_overrides, "train.steps=4"), tmp_path / "r")
    with pytest.raises(ConfigError, match=r"different config \(train.steps: 4 in checkpoint step_000004 vs 5 now\).*--overwrite"):
        train(_cfg(tiny_overrides, "train.steps=5"), tmp_path / "r")
    summary = train(_cfg(tiny_overrides, "train.steps=5"), tmp_path / "r", overwrite=True)
    assert summary["steps"] == 5 and summary["resumed_from"] == 0
    assert [c.step for c in ckpt.list_checkpoints(tmp_path / "r")] == [5]


def _poison_training_step(monkeypatch, step: int, value: float) -> None:
    """Make the training loss of step `step` (1-based, one micro-batch per step) non-finite."""
    real = trainer_module.token_losses
    seen = {"n": 0}

    def poisoned(model, batch):
        losses = real(model, batch)
        if model.training:
            seen["n"] += 1
            if seen["n"] == step:
                return losses * value
        return losses

    monkeypatch.setattr(trainer_module, "token_losses", poisoned)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_overrides, monkeypatch):
    _poison_training_step(monkeypatch, 7, float("nan"))
    cfg = _cfg(tiny_overrides, "train.steps=10", "train.checkpoint_every=3")
    with pytest.raises(NonFiniteLossError, match="step 7.*last good checkpoint: step_000006"):
        train(cfg, tmp_path / "r")
    infos = ckpt.list_checkpoints(tmp_path / "r")
    assert [c.step for c in infos] == [3, 6]
    for tensor in ckpt.load_model_state(infos[-1].path).values():
        assert torch.isfinite(tensor).all()


def test_non_finite_loss_can_skip_the_step(tmp_path, tiny_overrides, monkeypatch):
    _poison_training_step(monkeypatch, 3, float("inf"))
    summary = train(_cfg(tiny_overrides, "train.steps=5", "train.nonfinite=skip"), tmp_path / "r")
    assert summary["skipped_steps"] == 1
    for tensor in final_weights(tmp_path / "r").values():
        assert torch.isfinite(tensor).all()


def test_gradient_accumulation_matches_the_full_batch(tmp_path, tiny_overrides):
    # One lr for every group: Adam turns a near-zero gradient's summation-order noise into a step
    # of up to ~lr, so the tolerance below holds at full rank's 2e-3, not at the dense roles' 3e-2.
    same_lr = ["train.steps=3", "optim.lr=0.002", *(f"optim.{role}_lr=0.002" for role in ("embed", "head", "norm"))]
    whole = train(_cfg(tiny_overrides, *same_lr), tmp_path / "whole")
    accumulated = train(_cfg(tiny_overrides, *same_lr, "train.micro_batch_size=2"), tmp_path / "acc")
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "acc")
    for key in a:
        # Adam normalises tiny gradients, so summation-order noise shows up at ~1e-5 on a few entries.
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=5e-5)
    assert accumulated["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-4)


def test_resume_falls_back_past_a_checkpoint_with_a_flipped_byte(tmp_path, tiny_overrides, caplog):
    """Issue case 4: same size, one bit changed in optim.pt: never resumed from, named in a warning."""
    cfg = _cfg(tiny_overrides, "train.steps=6", "train.checkpoint_steps=3")
    train(cfg, tmp_path / "straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "damaged")
    (tmp_path / "damaged" / "summary.json").unlink()
    state_file = tmp_path / "damaged" / "checkpoints" / "step_000006" / "optim.pt"
    data = bytearray(state_file.read_bytes())
    data[len(data) // 2] ^= 0x04
    state_file.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="rankscope.train"):
        summary = train(cfg, tmp_path / "damaged")
    assert summary["resumed_from"] == 3
    assert "step_000006 is damaged (optim.pt does not match its content hash" in caplog.text
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "damaged")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_before_update_sees_the_clipped_gradient_before_the_update_and_skips_bad_steps(tmp_path, tiny_overrides,
                                                                                        monkeypatch):
    from rankscope.methods.full import FullRank

    calls = []

    def before_update(self, step, model, optimizer):
        params = [p for p in model.parameters() if p.requires_grad]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        calls.append((step, float(norm), [p.detach().clone() for p in params[:2]]))
        params[0].grad.zero_()  # what the hook does to a gradient reaches the update

    _poison_training_step(monkeypatch, 3, float("nan"))
    monkeypatch.setattr(FullRank, "before_update", before_update, raising=False)
    cfg = _cfg(tiny_overrides, "train.steps=5", "train.nonfinite=skip", "optim.grad_clip=0.01", "optim.lr=1e-2")
    train(cfg, tmp_path / "r")
    assert [step for step, _, _ in calls] == [1, 2, 4, 5]  # 1-based; the non-finite step 3 skips it
    assert all(norm <= 0.01 * (1 + 1e-4) for _, norm, _ in calls)  # after clipping (fp32 rounding)
    # Before the update: the weights it sees at step k+1 are those the update k produced.
    assert not torch.equal(calls[0][2][1], calls[1][2][1])
    # The zeroed gradient of the first parameter (the embeddings) left it unchanged by every update.
    assert all(torch.equal(calls[0][2][0], later[2][0]) for later in calls[1:])


def test_each_step_reads_the_device_once(tmp_path, tiny_overrides, monkeypatch):
    """On a GPU every read of a tensor's value by the host waits for all the work queued before it,
    so the host cannot queue the next step meanwhile. The loop reads the step's loss, gradient norm
    and stop votes together, in one `.tolist()` (validation and checkpoints read in their own modules)."""
    import sys

    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename == trainer_module.__file__:
                reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    train(_cfg(tiny_overrides, "train.steps=5", "train.micro_batch_size=4"), tmp_path / "r")
    assert reads == ["tolist"] * 5
