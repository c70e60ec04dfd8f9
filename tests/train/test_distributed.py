"""DDP on CPU (gloo): two processes with the same global batch follow the single-process run."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from rankscope.config import build_config
from rankscope.train.trainer import train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_two_processes_match_one(tmp_path, tiny_overrides):
    overrides = tiny_overrides + ["train.steps=6", "train.log_every=1"]
    single = train(build_config({}, overrides), tmp_path / "single")

    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "rankscope", "train", "--out", str(tmp_path / "ddp")]
    for item in overrides:
        command += ["--set", item]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    one, two = losses("single"), losses("ddp")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=2e-4)
    assert (tmp_path / "ddp" / ".rankscope-run.json").is_file()  # rank 0 set the folder up
    assert not (tmp_path / "ddp" / ".rankscope-lock").exists()  # and released its lock
    ddp_summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp_summary["world_size"] == 2
    assert ddp_summary["val_loss"] == pytest.approx(single["val_loss"], rel=2e-4)
