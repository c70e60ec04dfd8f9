import json
import logging
import os

import pytest
import torch
import xxhash

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


def test_unreadable_state_file_of_an_unhashed_checkpoint_is_reported(tmp_path):
    path = _save(tmp_path, 5)
    _drop_hashes(path)
    target = path / "optim.pt"
    target.write_bytes(b"\0" * target.stat().st_size)  # same size, garbage content
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


def _drop_hashes(path):
    """Rewrite meta.json as rankscope wrote it before content hashes: {file: size}."""
    meta = json.loads((path / "meta.json").read_text())
    meta["files"] = {name: entry["size"] for name, entry in meta["files"].items()}
    meta.pop("hash_algorithm")
    (path / "meta.json").write_text(json.dumps(meta))


def _flip_byte(file, offset=None):
    data = bytearray(file.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


def test_meta_records_a_content_hash_of_every_file(tmp_path):
    path = _save(tmp_path, 5)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["hash_algorithm"] == "xxh3_128"
    for name in ("model.safetensors", "optim.pt"):
        assert meta["files"][name] == {"size": (path / name).stat().st_size, "hash": xxhash.xxh3_128((path / name).read_bytes()).hexdigest()}


@pytest.mark.parametrize("name", ["model.safetensors", "optim.pt"])
def test_a_flipped_byte_of_the_same_size_is_detected(tmp_path, name):
    path = _save(tmp_path, 5)
    _flip_byte(path / name)
    with pytest.raises(CheckpointError, match=f"step_000005 is damaged: {name} does not match its content hash"):
        ckpt.verify_checkpoint(path)
    loader = ckpt.load_model_state if name == "model.safetensors" else ckpt.load_training_state
    with pytest.raises(CheckpointError, match="does not match its content hash"):
        loader(path)


def test_a_checkpoint_without_hashes_still_loads(tmp_path, caplog):
    path = _save(tmp_path, 5, 2.0)
    _drop_hashes(path)
    with caplog.at_level(logging.DEBUG, logger="rankscope.train"):
        assert torch.equal(ckpt.load_model_state(path)["w"], torch.full((3, 2), 2.0))
    assert "no content hash" in caplog.text
    assert ckpt.latest_intact_checkpoint(tmp_path).step == 5


def test_latest_intact_falls_back_past_a_damaged_checkpoint_and_names_it(tmp_path, caplog):
    for step in (2, 4, 6):
        _save(tmp_path, step, float(step))
    _flip_byte(tmp_path / "checkpoints" / "step_000006" / "optim.pt")
    with caplog.at_level(logging.WARNING, logger="rankscope.train"):
        latest = ckpt.latest_intact_checkpoint(tmp_path)
    assert latest.step == 4
    assert "step_000006 is damaged" in caplog.text
    assert [c.step for c in ckpt.intact_checkpoints(tmp_path)] == [2, 4]
    assert (tmp_path / "checkpoints" / "step_000006").is_dir()  # looking never deletes


def test_resaving_over_a_damaged_step_keeps_the_damaged_one_aside(tmp_path):
    path = _save(tmp_path, 5, 1.0)
    _flip_byte(path / "model.safetensors")
    _save(tmp_path, 5, 3.0)
    kept = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_000005.damaged-")]
    assert len(kept) == 1
    assert torch.equal(ckpt.load_model_state(ckpt.latest_intact_checkpoint(tmp_path).path)["w"], torch.full((3, 2), 3.0))
