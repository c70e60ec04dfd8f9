import json
import os

import pytest
import torch

from rankscope.errors import CheckpointError
from rankscope.train import checkpoint as ckpt


def _save(run_dir, step, value=1.0):
    return ckpt.save_checkpoint(
        run_dir, step, {"w": torch.full((3, 2), value)}, {"step": step, "extra": torch.arange(4)}, {"note": "x"}
    )


def test_round_trip_and_listing(tmp_path):
    _save(tmp_path, 5, 1.0)
    _save(tmp_path, 10, 2.0)
    infos = ckpt.list_checkpoints(tmp_path)
    assert [i.step for i in infos] == [5, 10]
    state = ckpt.load_model_state(infos[-1].path)
    assert torch.equal(state["w"], torch.full((3, 2), 2.0))
    training = ckpt.load_training_state(infos[-1].path)
    assert training["step"] == 10 and torch.equal(training["extra"], torch.arange(4))
    assert infos[-1].meta["complete"] is True and infos[-1].meta["note"] == "x"


def test_a_write_killed_midway_leaves_no_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 5)

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # stands for a kill between the two files

    monkeypatch.setattr(ckpt.torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 10)
    assert [i.step for i in ckpt.list_checkpoints(tmp_path)] == [5]


def test_temp_folder_from_a_hard_kill_is_ignored_and_cleaned(tmp_path):
    _save(tmp_path, 5)
    half = tmp_path / "checkpoints" / ".tmp_step_000010_123_456"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    assert [i.step for i in ckpt.list_checkpoints(tmp_path)] == [5]
    ckpt.clean_temp_dirs(tmp_path)
    assert not half.exists()


def test_folder_without_complete_meta_is_not_a_checkpoint(tmp_path):
    path = _save(tmp_path, 5)
    meta = json.loads((path / "meta.json").read_text())
    meta["complete"] = False
    (path / "meta.json").write_text(json.dumps(meta))
    assert ckpt.list_checkpoints(tmp_path) == []


def test_truncated_file_is_reported_with_the_fix(tmp_path):
    path = _save(tmp_path, 5)
    target = path / "model.safetensors"
    os.truncate(target, target.stat().st_size - 3)
    with pytest.raises(CheckpointError, match="truncated or corrupt.*delete that folder"):
        ckpt.load_model_state(path)


def test_corrupt_state_file_is_reported(tmp_path):
    path = _save(tmp_path, 5)
    target = path / "optim.pt"
    size = target.stat().st_size
    target.write_bytes(b"\0" * size)  # same size, garbage content
    with pytest.raises(CheckpointError, match="cannot read"):
        ckpt.load_training_state(path)


def test_resaving_a_step_replaces_it(tmp_path):
    _save(tmp_path, 5, 1.0)
    _save(tmp_path, 5, 3.0)
    infos = ckpt.list_checkpoints(tmp_path)
    assert len(infos) == 1
    assert torch.equal(ckpt.load_model_state(infos[0].path)["w"], torch.full((3, 2), 3.0))


def test_prune_keeps_protected_steps(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    ckpt.prune_checkpoints(tmp_path, keep_last=2, protect={1})
    assert [i.step for i in ckpt.list_checkpoints(tmp_path)] == [1, 3, 4]
