import json
import logging
import os
import random

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


# -- random state per rank ---------------------------------------------------------------------

def _random_state(seed, gpu_state=None):
    """A process's random state after seeding with `seed`; `gpu_state` stands for its GPU's."""
    torch.manual_seed(seed)
    random.seed(seed)
    state = ckpt.capture_rng_state(torch.device("cpu"))
    if gpu_state is not None:
        state["cuda"] = torch.tensor([gpu_state], dtype=torch.uint8)
    return state


def _gpu_recorder():
    calls = []
    return calls, lambda state, device: calls.append((int(state[0]), device))


def test_a_process_captures_its_own_gpu_generator_only():
    asked = []
    state = ckpt.capture_rng_state(torch.device("cuda", 3), get_cuda_state=lambda device: asked.append(device) or torch.ones(2))
    assert asked == [torch.device("cuda", 3)] and torch.equal(state["cuda"], torch.ones(2))
    assert set(ckpt.capture_rng_state(torch.device("cpu"))) == {"torch", "python"}


def test_each_rank_restores_its_own_state_on_its_own_gpu():
    saved = {"ranks": [_random_state(1, gpu_state=10), _random_state(2, gpu_state=20)]}
    calls, record = _gpu_recorder()
    torch.manual_seed(99)
    assert ckpt.restore_rng_state(saved, rank=1, world_size=2, device=torch.device("cuda", 1), fresh_seed=0,
                                  set_cuda_state=record)
    assert torch.equal(torch.get_rng_state(), saved["ranks"][1]["torch"])
    assert random.getstate() == saved["ranks"][1]["python"]
    assert calls == [(20, torch.device("cuda", 1))]  # rank 1's generator, on rank 1's GPU, and nothing else


def test_fewer_processes_than_saved_resume_with_a_warning(caplog):
    saved = {"ranks": [_random_state(1), _random_state(2)]}
    with caplog.at_level(logging.WARNING, logger="rankscope.train"):
        assert ckpt.restore_rng_state(saved, rank=0, world_size=1, device=torch.device("cpu"), fresh_seed=0)
    assert torch.equal(torch.get_rng_state(), saved["ranks"][0]["torch"])
    assert "random state of 2 process(es), this run has 1: the states of ranks 1..1 are left unused" in caplog.text


def test_a_rank_without_a_saved_state_starts_a_fresh_stream(caplog):
    saved = {"ranks": [_random_state(1), _random_state(2)]}
    with caplog.at_level(logging.WARNING, logger="rankscope.train"):
        assert ckpt.restore_rng_state(saved, rank=0, world_size=3, device=torch.device("cpu"), fresh_seed=0)
        assert not ckpt.restore_rng_state(saved, rank=2, world_size=3, device=torch.device("cpu"), fresh_seed=1234)
    assert torch.initial_seed() == 1234
    assert "this run has 3: ranks 2..2 start fresh streams" in caplog.text


def test_a_single_process_checkpoint_of_every_visible_gpu_resumes_on_fewer_gpus(caplog):
    """Checkpoints written before per-rank states hold torch.cuda.get_rng_state_all(): one state per
    GPU the process saw (8 under torchrun on an 8-GPU node). Restoring all of them on a machine
    with fewer GPUs raised IndexError; now only the process's own GPU is set."""
    legacy = _random_state(3)
    legacy["cuda"] = [torch.tensor([index], dtype=torch.uint8) for index in range(8)]
    calls, record = _gpu_recorder()
    assert ckpt.restore_rng_state(legacy, rank=0, world_size=1, device=torch.device("cuda", 0), fresh_seed=0,
                                  set_cuda_state=record)
    assert calls == [(0, torch.device("cuda", 0))]
    assert torch.equal(torch.get_rng_state(), legacy["torch"])
    with caplog.at_level(logging.WARNING, logger="rankscope.train"):  # a GPU index the checkpoint never saw
        ckpt.restore_rng_state(legacy, rank=0, world_size=1, device=torch.device("cuda", 9), fresh_seed=0,
                               set_cuda_state=record)
    assert len(calls) == 1 and "no CUDA random state for cuda:9" in caplog.text
