"""DDP on CPU (gloo): two processes with the same global batch follow the single-process run.

One torchrun launch of tests/train/ddp_worker.py (module fixture `ddp`) trains every two-process
run these tests look at; each test reads what the worker saved per rank.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from helpers import TINY_RUN  # tests/ is on sys.path
from rankscope.config import build_config
from rankscope.data import prepare_data
from rankscope.optim import galore as galore_module
from rankscope.train import checkpoint as ckpt
from rankscope.train import distributed
from rankscope.train.setup import build_run_model, evaluate_loss
from rankscope.train.trainer import train

TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
launches = [pytest.mark.distributed, pytest.mark.slow, needs_torchrun]

# Six steps; two micro-batches per process (so no_sync accumulation runs); an eval batch of 5 over
# 32 val sequences: 7 batches, 4 on rank 0 and 3 on rank 1 (an uneven last round).
DDP_RUN = ["train.steps=6", "train.log_every=1", "train.micro_batch_size=2", "train.eval_batch_size=5"]
# Periodic work every 2 steps, so merges, projector refreshes and exact steps happen under DDP.
METHODS = {
    "full": ["method.name=full"],
    "galore": ["method.name=galore", "method.update_proj_gap=2"],
    "sltrain": ["method.name=sltrain"],
    "loro": ["method.name=loro", "method.exact_every=2", "method.rewarm_steps=1"],
    "switchlora": ["method.name=switchlora"],  # its candidate banks are buffers that change every step
    # ReLoRA trains W0 for 2 steps, then freezes it (DDP must drop it), then merges every 2 steps.
    "relora_warm": ["method.name=relora", "method.warm_start_steps=2", "method.reset_every=2",
                    "method.restart_warmup=1"],
}
LORA = ["method.name=lora", "train.checkpoint_steps=[2]"]  # LoRA's adapter dropout is 0.1


def _runs(tmp: Path, tiny_overrides: list[str]) -> list[dict]:
    base = tiny_overrides + DDP_RUN
    runs = [{"name": name, "overrides": base + extra} for name, extra in METHODS.items()]
    runs += [
        {"name": "lora", "overrides": base + LORA},
        # Asked to stop by rank 1 only, as update 3 completes (after the step's vote was taken).
        {"name": "lora_stopped", "overrides": base + LORA, "stop_at": 3, "stop_ranks": [1]},
        # Asked to stop by rank 1 only, at the first batch of the validation after step 3.
        {"name": "lora_stopped_in_validation", "overrides": base + LORA + ["train.eval_every=3"],
         "stop_in_validation": 1, "stop_ranks": [1]},
    ]
    for run in runs:
        run["run_dir"] = str(tmp / run["name"])
    return runs


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, rankscope_cache):
    tmp = tmp_path_factory.mktemp("ddp")
    runs = _runs(tmp, list(TINY_RUN))
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"out": str(tmp), "runs": runs}))
    env = dict(os.environ, OMP_NUM_THREADS="1", RANKSCOPE_CACHE=rankscope_cache)
    worker = Path(__file__).with_name("ddp_worker.py")
    done = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", str(worker), str(spec)],
                          env=env, capture_output=True, text=True, timeout=900)
    # torchrun's own report comes last; the workers' tracebacks before it.
    assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines() if "[rank" in line)[-5000:]

    class Runs:
        def __getitem__(self, name):
            return [torch.load(tmp / f"{name}.rank{rank}.pt", weights_only=False) for rank in (0, 1)]

        def overrides(self, name):
            return next(run["overrides"] for run in runs if run["name"] == name)

        def run_dir(self, name):
            return tmp / name

    return Runs()


def _same_replicas(rank0, rank1, label):
    assert rank0["weights"].keys() == rank1["weights"].keys()
    for key in rank0["weights"]:
        assert torch.equal(rank0["weights"][key], rank1["weights"][key]), f"{label}: replicas differ at {key}"


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.distributed
@pytest.mark.slow
@needs_torchrun
def test_replicas_stay_identical_and_follow_one_process(ddp, tmp_path, method):
    """Every method's periodic work (ReLoRA's warm-start switch and merges, GaLore's refreshes,
    LORO's exact steps, SwitchLoRA's switches) keeps the replicas bit-identical, with gradients in
    DDP's buckets and no buffer broadcasts, and the run follows the single-process one."""
    rank0, rank1 = ddp[method]
    _same_replicas(rank0, rank1, method)
    assert rank0["grads_share_buckets"] is True  # gradient_as_bucket_view
    assert rank0["buffer_syncs"] == rank1["buffer_syncs"] == 0  # broadcast_buffers=False

    # Two processes sum the same gradients in another order, and Adam turns that noise on
    # near-zero gradients into steps of up to ~lr, so the weights are compared through the losses.
    single = train(build_config({}, ddp.overrides(method)), tmp_path / "single")
    one, two = _losses(tmp_path / "single"), _losses(ddp.run_dir(method))
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, rel=2e-4)
    assert rank0["summary"]["val_loss"] == pytest.approx(single["val_loss"], rel=2e-4)


@pytest.mark.distributed
@pytest.mark.slow
@needs_torchrun
def test_galore_refreshes_are_shared_out_among_the_replicas(ddp, tmp_path, monkeypatch):
    """Each refresh's SVDs run once over both replicas, split between them (the projectors are
    broadcast: the replicas stay identical, see above), instead of twice."""
    rank0, rank1 = ddp["galore"]
    calls = []
    real = galore_module.compute_projection

    def counting(matrices, *args, **kwargs):
        calls.append(1 if matrices.dim() == 2 else matrices.shape[0])
        return real(matrices, *args, **kwargs)

    monkeypatch.setattr(galore_module, "compute_projection", counting)
    train(build_config({}, ddp.overrides("galore")), tmp_path / "single")
    single = sum(calls)  # refreshes at steps 0, 2 and 4, every targeted matrix
    assert single > 0 and single % 3 == 0
    assert rank0["svds"] + rank1["svds"] == single
    assert abs(rank0["svds"] - rank1["svds"]) <= 3  # at most one more per refresh


def _losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.distributed
@pytest.mark.slow
@needs_torchrun
def test_ranks_draw_their_own_dropout_masks_reproducibly(ddp):
    rank0, rank1 = ddp["lora"]
    assert len(rank0["masks"]) == len(rank1["masks"]) > 0
    for mask0, mask1 in zip(rank0["masks"], rank1["masks"]):
        assert not torch.equal(mask0, mask1)  # independent dropout, not the same positions on each rank
        assert 0.05 < mask0.float().mean() < 0.15  # and still dropout at p = 0.1
    again0, again1 = ddp["lora_stopped"]  # the same run, launched again (it stopped later on)
    for first, second in ((rank0, again0), (rank1, again1)):
        assert all(torch.equal(a, b) for a, b in zip(first["masks"], second["masks"], strict=True))


@pytest.mark.distributed
@pytest.mark.slow
@needs_torchrun
def test_a_stop_asked_by_one_rank_stops_both_and_resumes_bit_for_bit(ddp):
    """The ranks agree on a stop one of them asked for; the resume restores each rank's own random
    state, so its dropout masks, and so the weights, are those of the run that never stopped."""
    straight0, straight1 = ddp["lora"]
    for name in ("lora_stopped", "lora_stopped_in_validation"):
        rank0, rank1 = ddp[name]
        _same_replicas(rank0, rank1, name)
        # A request after the step's vote (taken with the loss) is counted one step later; one
        # made during a validation cuts it short in that step.
        assert rank0["stopped_at"] == rank1["stopped_at"] == (4 if name == "lora_stopped" else 3)
        assert rank0["summary"]["resumed_from"] == rank0["stopped_at"]
        for key, value in straight0["weights"].items():
            assert torch.equal(rank0["weights"][key], value), f"{name}: {key}"
        assert rank0["summary"]["val_loss"] == straight0["summary"]["val_loss"]
    _same_replicas(straight0, straight1, "lora")


@pytest.mark.distributed
@pytest.mark.slow
@needs_torchrun
def test_validation_is_shared_out_and_equals_one_process(ddp):
    """Each rank evaluates its share of the val set, and the all-reduced result is the
    single-process evaluation of the same weights, bit for bit."""
    rank0, rank1 = ddp["full"]
    cfg = build_config({}, ddp.overrides("full"))
    data = prepare_data(cfg.data)
    model, _ = build_run_model(cfg, _model_config_of(ddp.run_dir("full")))
    model.load_state_dict(rank0["weights"])
    alone = evaluate_loss(model, data.val, cfg.train.eval_batch_size, torch.device("cpu"))
    for rank in (rank0, rank1):
        assert rank["summary"]["val_loss"] == alone["loss"]
        assert rank["summary"]["val_loss_literature_protocol"] == alone["literature_loss"]
        assert rank["summary"]["val_tokens"] == alone["tokens"]
    # Two validations (initial and final) of 7 batches: 4 + 3 each, none evaluated twice.
    assert (rank0["eval_batches"], rank1["eval_batches"]) == (2 * 4, 2 * 3)


@pytest.mark.distributed
@pytest.mark.slow
@needs_torchrun
def test_a_stop_asked_during_a_validation_ends_it_on_every_rank(ddp):
    """Rank 1 asks during its first batch of the step-3 validation: both ranks leave that
    validation after its first round (one batch each) instead of finishing it."""
    rank0, rank1 = ddp["lora_stopped_in_validation"]
    # initial validation (4 | 3 batches), step 3 cut short (1 | 1), step 6 after the resume (4 | 3)
    assert (rank0["eval_batches"], rank1["eval_batches"]) == (4 + 1 + 4, 3 + 1 + 3)
    assert [c.step for c in ckpt.list_checkpoints(ddp.run_dir("lora_stopped_in_validation"))] == [2, 6]


def _model_config_of(run_dir):
    from rankscope.models import LlamaConfig

    return LlamaConfig(**ckpt.list_checkpoints(run_dir)[-1].meta["model_config"])


@pytest.mark.distributed
@pytest.mark.slow
@needs_torchrun
def test_a_two_process_checkpoint_resumes_in_one_process_with_a_warning(ddp, tmp_path, caplog):
    """Resuming with fewer processes than saved the checkpoint (a smaller allocation after a
    requeue) works: rank 0 takes its own state and says the others are unused."""
    run = tmp_path / "resumed"
    shutil.copytree(ddp.run_dir("lora"), run)
    (run / "summary.json").unlink()
    shutil.rmtree(ckpt.step_dir(run, 6))
    assert len(ckpt.load_training_state(ckpt.step_dir(run, 2))["rng"]["ranks"]) == 2
    with caplog.at_level(logging.WARNING, logger="rankscope.train"):
        summary = train(build_config({}, ddp.overrides("lora")), run)
    assert summary["resumed_from"] == 2 and summary["world_size"] == 1
    assert "random state of 2 process(es), this run has 1" in caplog.text


@pytest.mark.distributed
@pytest.mark.slow
@needs_torchrun
def test_two_processes_match_one(tmp_path, tiny_overrides):
    """`rankscope train` under torchrun (the process group from the environment)."""
    overrides = tiny_overrides + ["train.steps=6", "train.log_every=1"]
    single = train(build_config({}, overrides), tmp_path / "single")

    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "rankscope", "train", "--out", str(tmp_path / "ddp")]
    for item in overrides:
        command += ["--set", item]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    one, two = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=2e-4)
    assert (tmp_path / "ddp" / ".rankscope-run.json").is_file()  # rank 0 set the folder up
    assert not (tmp_path / "ddp" / ".rankscope-lock").exists()  # and released its lock
    ddp_summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp_summary["world_size"] == 2
    assert ddp_summary["val_loss"] == pytest.approx(single["val_loss"], rel=2e-4)


@pytest.mark.parametrize("device_type, device_id", [("cpu", None), ("cuda", torch.device("cuda", 1))])
def test_the_process_group_gets_the_configured_timeout_and_its_gpu(monkeypatch, device_type, device_id):
    """NCCL's default timeout (10 min) is shorter than rank 0 may take alone to write a large
    checkpoint while the others wait; train.dist_timeout_min replaces it."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda index: calls.append({"set_device": index}))
    info = distributed.init_distributed(device_type, timeout_min=90)
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 1)
    group = calls[-1]
    assert group["timeout"] == timedelta(minutes=90)
    assert group["backend"] == ("nccl" if device_type == "cuda" else "gloo")
    assert group["device_id"] == device_id


def test_train_passes_the_configured_timeout(monkeypatch, tiny_overrides, tmp_path):
    seen = []

    def init_distributed(device_type, timeout_min):
        seen.append(timeout_min)
        return distributed.DistInfo()

    from rankscope.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "init_distributed", init_distributed)
    train(build_config({}, tiny_overrides + ["train.steps=1", "train.dist_timeout_min=75"]), tmp_path / "r")
    assert seen == [75]
