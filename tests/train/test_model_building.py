"""Building a run's model without wasted work: a model a checkpoint fills is never initialised
(no Spectron SVD on resume or analysis load), checkpoint files are hashed by rank 0 only, and the
optimizer state is read memory-mapped. Plus the fp32 matmul precision a run records."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import TINY_RUN, assert_same_weights, final_weights, train_interrupted  # tests/ is on sys.path
from rankscope import methods
from rankscope.config import build_config
from rankscope.models import get_preset
from rankscope.train import checkpoint as ckpt
from rankscope.train import setup as run_setup
from rankscope.train.distributed import DistInfo
from rankscope.train.setup import (
    build_run_model,
    build_skeleton,
    find_resume_checkpoint,
    float32_matmul_precision,
    load_run_model,
)
from rankscope.train.trainer import train


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", methods.names())
def test_a_skeleton_filled_from_a_state_dict_is_the_model(method, dtype):
    """Every method's model built on the meta device and materialised empty holds, once the state
    dict is loaded, every tensor of the initialised model (the RoPE tables, which no checkpoint
    holds, included), where it was (SwitchLoRA's candidates stay in host memory), and computes
    the same logits."""
    cfg = build_config({}, ["model.preset=tiny", f"method.name={method}"])
    model_cfg = dataclasses.replace(get_preset("tiny"), num_layers=2, vocab_size=256)
    built, _ = build_run_model(cfg, model_cfg)
    built.to(dtype)
    skeleton, _ = build_skeleton(cfg, model_cfg, "cpu", dtype)
    skeleton.load_state_dict(built.state_dict())
    filled = dict([*skeleton.named_parameters(), *skeleton.named_buffers()])
    for name, tensor in [*built.named_parameters(), *built.named_buffers()]:
        other = filled[name]
        assert (other.dtype, other.device, other.requires_grad) == (tensor.dtype, tensor.device, tensor.requires_grad), name
        assert torch.equal(other, tensor), name
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(skeleton.eval()(ids), built.eval()(ids))


@pytest.fixture
def svd_calls(monkeypatch):
    """The (shape, device type) of every torch.linalg.svd call (Spectron's init makes one per
    targeted weight)."""
    calls = []
    real = torch.linalg.svd

    def counted(*args, **kwargs):
        calls.append((tuple(args[0].shape), args[0].device.type))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counted)
    return calls


def test_resuming_or_loading_a_spectron_run_runs_no_svd(tmp_path, svd_calls):
    """A fresh Spectron run factorizes each of its 2 x 7 targeted weights once; a resumed run and
    an analysis load build a skeleton the checkpoint fills, so they run none, and the resumed run
    still ends with exactly the weights of the uninterrupted one."""
    cfg = build_config({}, TINY_RUN + ["method.name=spectron", "train.steps=4", "train.checkpoint_steps=[2]"])
    train(cfg, tmp_path / "straight")
    assert len(svd_calls) == 2 * 7
    train_interrupted(cfg, tmp_path / "resumed", after_step=3)  # its step-3 state is lost; resume from 2
    svd_calls.clear()
    train(cfg, tmp_path / "resumed")
    assert svd_calls == []
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"), "resumed")
    loaded = load_run_model(tmp_path / "straight", step=2)
    assert svd_calls == []
    saved = ckpt.load_model_state(ckpt.step_dir(tmp_path / "straight", 2))
    assert_same_weights({k: v for k, v in loaded.model.state_dict().items() if k in saved}, saved, "loaded")


@pytest.fixture
def hashed(monkeypatch):
    """The files whose content hash is computed (fresh: the per-process cache is emptied)."""
    monkeypatch.setattr(ckpt, "_verified", {})
    files = []
    real = ckpt.file_digest

    def counted(path, *args, **kwargs):
        files.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "file_digest", counted)
    return files


def _save(run_dir, step):
    ckpt.save_checkpoint(run_dir, step, {"w": torch.full((3, 2), float(step))},
                         {"optimizer": {"state": {}, "param_groups": []}, "step": step}, {})


def test_only_rank_0_hashes_the_checkpoint_it_resumes_from(tmp_path, monkeypatch, hashed):
    """Rank 0 checks the newest checkpoint's files, finds one damaged and falls back to the one
    before; another rank takes rank 0's choice (passed to it by the all-gather) and loads that
    checkpoint without reading any file just to hash it."""
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    weights = ckpt.step_dir(tmp_path, 4) / ckpt.MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    hashed.clear()  # the saves hashed what they wrote

    chosen_by_rank_0 = find_resume_checkpoint(tmp_path, DistInfo())
    assert chosen_by_rank_0.step == 2
    assert hashed  # rank 0 verified
    hashed.clear()
    ckpt._verified.clear()  # another rank is another process: nothing hashed there yet
    monkeypatch.setattr(run_setup, "all_gather_objects", lambda value, info: [chosen_by_rank_0.step, value])
    on_rank_1 = find_resume_checkpoint(tmp_path, DistInfo(rank=1, world_size=2))
    assert on_rank_1.step == 2 and on_rank_1.path == chosen_by_rank_0.path
    state = ckpt.load_model_state(on_rank_1.path, verify=False)
    assert ckpt.load_training_state(on_rank_1.path, verify=False)["step"] == 2
    assert torch.equal(state["w"], torch.full((3, 2), 2.0))
    assert hashed == []


_RSS_PROBE = """
import os, sys
from pathlib import Path
from rankscope.train import checkpoint as ckpt

def resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

path = Path(sys.argv[1])
ckpt.verify_checkpoint(path)  # hashing reads through the page cache, not into this process
before = resident_bytes()
state = ckpt.load_training_state(path)
print(resident_bytes() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from Linux's /proc")
def test_the_optimizer_state_is_read_memory_mapped(tmp_path):
    """Loading a 64 MiB optimizer state leaves the process's resident memory nearly where it
    was: its tensors are views of the mapped file, read when used (copied whole, the resident
    memory grows by the full 64 MiB)."""
    size = 64 << 20
    state = {"optimizer": {"state": {i: {"exp_avg": torch.rand(size // 16 // 4)} for i in range(16)}}}
    path = ckpt.save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, state, {})
    grown = int(subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path)], check=True, capture_output=True,
                               text=True).stdout.strip())
    assert grown < size / 8


def test_tf32_is_allowed_on_cuda_only_and_put_back_after():
    """The seam the trainer runs inside: on CUDA with train.tf32 fp32 matmuls may use TF32
    (torch's "high"), without it they stay "highest"; on the CPU the setting is not touched. The
    previous setting is back afterwards. (No GPU is needed: the setting is process-wide.)"""
    assert torch.get_float32_matmul_precision() == "highest"
    with float32_matmul_precision(torch.device("cuda", 0), tf32=True) as precision:
        assert precision == "high" == torch.get_float32_matmul_precision()
    assert torch.get_float32_matmul_precision() == "highest"
    with float32_matmul_precision(torch.device("cuda"), tf32=False) as precision:
        assert precision == "highest"
    torch.set_float32_matmul_precision("medium")
    try:
        with float32_matmul_precision(torch.device("cpu"), tf32=True) as precision:
            assert precision == "medium"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_a_run_records_its_fp32_matmul_precision(tmp_path):
    summary = train(build_config({}, TINY_RUN + ["train.steps=1"]), tmp_path / "run")
    assert summary["float32_matmul_precision"] == "highest"  # a CPU run: true fp32
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["float32_matmul_precision"] == "highest"


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_on_a_gpu_the_model_is_built_there(svd_calls):
    """A new run on a GPU is initialised there (Spectron's SVDs run on the GPU, no fp32 model in
    host memory); SwitchLoRA's candidates stay in host memory, in a new model and in a skeleton."""
    from rankscope.train.setup import build_training_model

    model_cfg = dataclasses.replace(get_preset("tiny"), num_layers=2, vocab_size=256)
    device = torch.device("cuda", torch.cuda.current_device())
    spectron = build_config({}, ["model.preset=tiny", "method.name=spectron", "train.precision=bf16-pure"])
    model, _ = build_training_model(spectron, model_cfg, device, resuming=False)
    assert {t.device for t in model.state_dict().values()} == {device}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rotary.cos_cached.dtype == torch.float32
    assert len(svd_calls) == 2 * 7 and {kind for _, kind in svd_calls} == {"cuda"}
    switchlora = build_config({}, ["model.preset=tiny", "method.name=switchlora"])
    for resuming in (False, True):
        model, _ = build_training_model(switchlora, model_cfg, device, resuming=resuming)
        for name, tensor in model.named_buffers():
            assert tensor.device.type == ("cpu" if "candidates" in name else "cuda"), (resuming, name)
