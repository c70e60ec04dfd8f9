"""FSDP2 (train.parallel=fsdp) on CPU with gloo: every supported method trains sharded as it trains
in one process, resumes exactly, and its checkpoints load at another world size.

One torchrun launch (tests/train/fsdp_worker.py) trains all the two-process runs; the
one-process references are trained here first (train.parallel=fsdp in one process: a plain model
with sharded-format checkpoints). Runs are 3 updates of the tiny model cut to 2 layers, with every
method's periodic work due after update 2, so update 3 sees its effect.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import TINY_RUN
from rankscope import methods
from rankscope.config import build_config
from rankscope.errors import CheckpointError, ConfigError
from rankscope.train import checkpoint as ckpt
from rankscope.train.dcp_files import read_model_state
from rankscope.train.setup import check_method_settings, load_run_model
from rankscope.train.trainer import train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 3
RUN = TINY_RUN + [f"train.steps={STEPS}", "train.log_every=1", "train.checkpoint_every=2", "train.parallel=fsdp",
                  "train.dynamics_every=0", "data.val_sequences=16"]
# Each supported method with its periodic work due after update 2 (and no adapter dropout, whose
# masks a process draws for its own rows only).
SUPPORTED = {
    "full": [],
    "frozen": [],
    "lowrank": ["method.refactor_every=2"],
    "lora": ["method.dropout=0.0"],
    "relora": ["method.dropout=0.0", "method.reset_every=2", "method.restart_warmup=1", "method.schedule=shifted",
               "method.initial_a=kaiming"],
    "cola": [],
    "sltrain": ["method.refactor_every=2"],
    "loro": ["method.exact_every=2", "method.rewarm_steps=1"],
    "spectron": [],
    "galore": ["method.update_proj_gap=2"],
    "fira": ["method.update_proj_gap=2"],
    "golore": ["method.update_proj_gap=2", "method.random_from=2"],
    "spam": ["method.reset_every=2", "method.clip_start=0", "method.spike_threshold=1.0"],
}
REFUSED = {"switchlora", "apollo", "apollo_mini", "stable_spam"}
# fp32 reduction order (FSDP's reduce-scatter vs one process's sums) moves the losses by ~1e-7 to
# 1e-6; Spectron's Newton–Schulz iteration runs in bf16 and moves them by up to ~2e-5. A gather or
# a write-back gone wrong moves them by 5e-4 or more (measured by breaking each).
LOSS_TOLERANCE = 5e-5


def _overrides(method: str, *extra: str) -> list[str]:
    return RUN + [f"method.name={method}", *SUPPORTED[method], *extra]


def _losses(run_dir: Path) -> list[float]:
    """The training losses of every update, then the final validation loss: periodic work that
    keeps the function (a merge, a refactorization) shows only in the updates after it, so in the
    final model."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row] + [json.loads((run_dir / "summary.json").read_text())["val_loss"]]


def _rewind_to(source: Path, target: Path, step: int) -> Path:
    """A copy of a finished run folder as a kill after checkpoint `step` would have left it."""
    shutil.copytree(source, target)
    for info in ckpt.list_checkpoints(target):
        if info.step > step:
            shutil.rmtree(info.path)
    (target / "summary.json").unlink()
    return target


def _torchrun() -> str | None:
    return shutil.which("torchrun") or next(
        (p for p in [os.path.join(os.path.dirname(sys.executable), "torchrun")] if os.path.exists(p)), None)


def test_every_method_is_supported_or_refused_by_name():
    assert set(SUPPORTED) | REFUSED == set(methods.names())
    for name in sorted(REFUSED):
        cfg = build_config({}, TINY_RUN + ["train.parallel=fsdp", f"method.name={name}"])
        with pytest.raises(ConfigError, match=f"method '{name}' cannot train with train.parallel=fsdp: .+"):
            check_method_settings(cfg)
        check_method_settings(build_config({}, TINY_RUN + [f"method.name={name}"]))  # DDP is fine


def test_relora_warm_start_is_refused_under_fsdp():
    cfg = build_config({}, TINY_RUN + ["train.parallel=fsdp", "method.name=relora", "method.warm_start_steps=2"])
    with pytest.raises(ConfigError, match="'relora'.*warm_start_steps"):
        check_method_settings(cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """one_<m>: one process. two_<m>: two processes, killed as update 3 completes (after the
    checkpoint of update 2) and resumed. to_one_<m>: two_<m>'s checkpoint of update 2 resumed in
    one process. uninterrupted: galore in two processes without a kill. from_one: one_galore's
    checkpoint of update 2 resumed in two processes. bf16: full rank with bf16 parameters and
    activation checkpointing."""
    torchrun = _torchrun()
    if torchrun is None:
        pytest.skip("torchrun not installed")
    root = tmp_path_factory.mktemp("fsdp")
    for method in SUPPORTED:
        train(build_config({}, _overrides(method)), root / f"one_{method}")
    _rewind_to(root / "one_galore", root / "from_one", 2)

    spec_runs = [{"name": f"two_{m}", "run_dir": str(root / f"two_{m}"), "overrides": _overrides(m), "crash_at": 3}
                 for m in SUPPORTED]
    spec_runs += [
        {"name": "uninterrupted", "run_dir": str(root / "uninterrupted"), "overrides": _overrides("galore")},
        {"name": "from_one", "run_dir": str(root / "from_one"), "overrides": _overrides("galore")},
        {"name": "bf16", "run_dir": str(root / "bf16"),
         "overrides": _overrides("full", "train.precision=bf16-autocast", "train.activation_checkpointing=true")},
    ]
    spec = root / "spec.json"
    spec.write_text(json.dumps({"out": str(root), "runs": spec_runs, "optimizer_check": True}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = Path(__file__).with_name("fsdp_worker.py")
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(worker), str(spec)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    for method in SUPPORTED:
        _rewind_to(root / f"two_{method}", root / f"to_one_{method}", 2)
        train(build_config({}, _overrides(method)), root / f"to_one_{method}")
    return root


def test_two_processes_match_one_and_resume_after_a_kill_for_every_supported_method(runs):
    for method in SUPPORTED:
        assert json.loads((runs / f"two_{method}.rank0.json").read_text())["crashed_at"] == 3
        one, two = _losses(runs / f"one_{method}"), _losses(runs / f"two_{method}")
        assert len(one) == len(two) == STEPS + 1, method
        assert two == pytest.approx(one, rel=LOSS_TOLERANCE), method
        summary = json.loads((runs / f"two_{method}" / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["resumed_from"] == 2
        assert ckpt.list_checkpoints(runs / f"two_{method}")[-1].meta["format"] == "dcp"


def test_two_process_checkpoints_resume_in_one_process_for_every_supported_method(runs):
    for method in SUPPORTED:
        assert ckpt.list_checkpoints(runs / f"two_{method}")[0].meta["world_size"] == 2
        resumed = _losses(runs / f"to_one_{method}")
        assert resumed == pytest.approx(_losses(runs / f"two_{method}"), rel=LOSS_TOLERANCE), method


def test_sharded_projected_optimizers_match_plain_ones(runs):
    """GaLore / Fira / GoLore on row-sharded weights (right side: projected row by row; left side:
    all-reduced partial projections; refresh: gathered SVD) against the same optimizer on plain
    weights, over two refreshes, for every side and moment carry."""
    checks = [json.loads((runs / f"optimizer_check.rank{rank}.json").read_text()) for rank in (0, 1)]
    for check in checks:
        assert len(check["errors"]) == 21
        for case, error in check["errors"].items():
            # "full" projects onto an r x r core that is diagonal at a refresh: Adam normalises its
            # off-diagonal rounding noise (down to eps), so sums in another order move it by ~1e-5.
            assert error < (1e-4 if "/full/" in case else 2e-6), case
    # Each refresh's SVDs are shared out: 5 matrices, refreshed at steps 0, 2 and 4 (GoLore: SVD at
    # step 0 only, random projectors after), each SVD'd by one rank (rank 0: 3 of 5, rank 1: 2).
    for case in checks[0]["svds"]:
        refreshes = 1 if case.startswith("GoLore") else 3
        assert [check["svds"][case] for check in checks] == [3 * refreshes, 2 * refreshes], case


def test_killed_run_resumes_to_the_uninterrupted_result_bit_for_bit(runs):
    killed, uninterrupted = runs / "two_galore", runs / "uninterrupted"
    assert _losses(killed) == _losses(uninterrupted)
    final_killed = read_model_state(ckpt.list_checkpoints(killed)[-1].path)
    final_uninterrupted = read_model_state(ckpt.list_checkpoints(uninterrupted)[-1].path)
    assert final_killed.keys() == final_uninterrupted.keys()
    for key in final_killed:
        assert torch.equal(final_killed[key], final_uninterrupted[key]), key


def test_two_process_checkpoint_loads_as_a_plain_model(runs):
    """Export, analysis and eval load a run with load_run_model: a sharded checkpoint becomes the
    plain model, equal to the one-process run's up to fp32 reduction order."""
    for method in ("galore", "sltrain"):
        loaded, reference = load_run_model(runs / f"two_{method}"), load_run_model(runs / f"one_{method}")
        assert loaded.step == STEPS
        tokens = torch.randint(0, loaded.model_config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(tokens), reference.model(tokens), rtol=1e-3, atol=1e-3)
        assert load_run_model(runs / f"two_{method}", step=2).step == 2


def test_one_process_checkpoint_resumes_in_two_processes(runs):
    assert _losses(runs / "from_one") == pytest.approx(_losses(runs / "one_galore"), rel=LOSS_TOLERANCE)


def test_bf16_parameters_and_activation_checkpointing_train_sharded(runs):
    bf16, fp32 = _losses(runs / "bf16"), _losses(runs / "one_full")
    assert len(bf16) == STEPS + 1
    assert bf16 == pytest.approx(fp32, rel=2e-2)  # bf16 rounding, not another model
    assert bf16[-1] < bf16[0]


def test_a_damaged_shard_is_detected(runs, tmp_path):
    run_dir = shutil.copytree(runs / "two_full", tmp_path / "run")
    latest = ckpt.list_checkpoints(run_dir)[-1]
    shard = sorted((latest.path / "dcp").glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its content hash"):
        ckpt.verify_checkpoint(latest.path)
    assert ckpt.latest_intact_checkpoint(run_dir).step == 2  # falls back to the previous one
