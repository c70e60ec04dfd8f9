"""The local launcher: the same results whatever the number of workers, a dying worker fails only its
job, and Ctrl-C stops a training run at a checkpoint that the next run of the study resumes from."""

import json
import os
import signal
import threading

import pandas as pd
import pytest
import torch
from study_helpers import (
    checkpoint_weights,
    final_weights,
    last_logged_step,
    read_outcome,
    small_study,
    small_study_dict,
    start_driver,
    wait_for,
    write_study,
)

from rankscope.study import LaunchOptions, plan_runs, run_study
from rankscope.train import checkpoint as ckpt
from rankscope.train import train

pytestmark = pytest.mark.slow

TIMING_KEYS = {"wall_time", "train_time", "tokens_per_sec"}


def test_results_do_not_depend_on_the_number_of_workers(tmp_path):
    spec = small_study(seeds=[0])
    for workers in (1, 2):
        result = run_study(None, tmp_path / f"w{workers}", stages=("train", "analyze", "eval"), spec=spec,
                           launch=LaunchOptions(workers=workers))
        assert result["failed"] == []
    for run in plan_runs(spec):
        one, two = tmp_path / "w1" / "runs" / run.name, tmp_path / "w2" / "runs" / run.name
        for a_info, b_info in zip(ckpt.list_checkpoints(one), ckpt.list_checkpoints(two), strict=True):
            a, b = checkpoint_weights(a_info), checkpoint_weights(b_info)
            assert all(torch.equal(a[key], b[key]) for key in a), (run.name, a_info.step)
        summaries = [json.loads((d / "summary.json").read_text()) for d in (one, two)]
        assert [{k: v for k, v in s.items() if k not in TIMING_KEYS} for s in summaries] == \
            [{k: v for k, v in summaries[0].items() if k not in TIMING_KEYS}] * 2
        for table in ("landscape.csv", "interpolation.csv", "spectral.csv", "similarity.csv"):
            pd.testing.assert_frame_equal(pd.read_csv(one / "analysis" / table), pd.read_csv(two / "analysis" / table))
        evals = [json.loads((d / "eval" / f"step_{run.config.train.steps:06d}.json").read_text()) for d in (one, two)]
        assert evals[0] == evals[1]


def test_parallel_group_jobs_compare_with_the_other_seeds_and_compute_each_seed_pair_once(tmp_path):
    analysis = {"probe_size": 4, "interpolation_points": 3, "metrics": ["interpolation", "similarity"]}
    out = tmp_path / "study"
    result = run_study(None, out, stages=("train", "analyze", "report"), spec=small_study(analysis=analysis),
                       launch=LaunchOptions(workers=2))
    assert result["failed"] == []
    runs = out / "runs"

    def partners(run, table, column):
        frame = pd.read_csv(runs / run / "analysis" / f"{table}.csv")
        frame = frame[frame["kind"] == "imbh"] if table == "interpolation" else frame
        return dict(zip(frame[column], frame["pairing"]))

    for table, column in (("similarity", "reference_run"), ("interpolation", "other_run")):
        assert partners("lowrank-tiny-s1", table, column) == {"full-tiny-s1": "same-seed", "full-tiny-s0": "cross-seed"}
        # The seed pair of the full-rank runs: analysed once, by the seed-0 group's job.
        assert partners("full-tiny-s0", table, column) == {"full-tiny-s0": "self", "full-tiny-s1": "cross-seed",
                                                            **({"lowrank-tiny-s0": "same-seed"} if table == "interpolation" else {})}
        assert "full-tiny-s0" not in partners("full-tiny-s1", table, column)
    assert read_outcome(out, "analyze", "tiny-s1")["state"] == "done"
    assert "Distance from full rank against the full-rank seed baseline" in (out / "report" / "report.md").read_text()


def test_a_worker_that_dies_fails_its_job_and_the_study_goes_on(tmp_path):
    out = tmp_path / "study"
    spec = small_study(seeds=[0], steps=60, checkpoint_steps=(), slower=True)
    result = {}
    driver = threading.Thread(target=lambda: result.update(
        run_study(None, out, stages=("train", "analyze"), spec=spec, launch=LaunchOptions(workers=2))))
    driver.start()
    try:
        running = wait_for(lambda: (o := read_outcome(out, "train", "lowrank-tiny-s0")) and o["state"] == "running" and o,
                           240, "the lowrank run to start")
        os.kill(running["pid"], signal.SIGKILL)  # out of memory, a segfault, a stray kill...
    finally:
        driver.join(600)
    assert result["failed"] == ["lowrank-tiny-s0"]
    status = json.loads((out / "status.json").read_text())
    assert status["lowrank-tiny-s0"]["train"]["state"] == "failed"
    assert "worker process running it died (killed by SIGKILL)" in status["lowrank-tiny-s0"]["train"]["error"]
    assert status["lowrank-tiny-s0"]["train"]["log"] == "logs/train/lowrank-tiny-s0.log"
    assert status["full-tiny-s0"] == {"train": {"state": "done", "log": "logs/train/full-tiny-s0.log"},
                                      "analyze": {"state": "done", "log": "logs/analyze/tiny-s0.log"}}


def test_ctrl_c_checkpoints_the_running_run_and_the_next_study_run_resumes_it(tmp_path):
    spec = small_study_dict(seeds=[0], steps=40, checkpoint_steps=(), slower=True)
    out = tmp_path / "study"
    driver = start_driver([str(write_study(tmp_path / "s.yaml", spec)), "--out", str(out), "--stage", "train",
                           "--workers", "1"])
    lowrank = out / "runs" / "lowrank-tiny-s0"
    try:
        wait_for(lambda: last_logged_step(lowrank) >= 3 or driver.poll() is not None, 300, "the second run to train")
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C in the terminal: the driver and its workers
        output, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, output[-2000:]
    assert "re-run the same command to resume" in output
    stopped = read_outcome(out, "train", "lowrank-tiny-s0")
    assert stopped["state"] == "preempted" and stopped["step"] >= 3
    resume_point = ckpt.list_checkpoints(lowrank, include_preemption=True)[-1]
    assert resume_point.step == stopped["step"] and resume_point.meta["preemption"]
    full_checkpoints = {p: p.stat().st_mtime_ns for p in (out / "runs" / "full-tiny-s0").rglob("*.safetensors")}

    result = run_study(None, out, stages=("train",), spec=small_study(seeds=[0], steps=40, checkpoint_steps=(), slower=True),
                       launch=LaunchOptions(workers=1))
    assert result["failed"] == []
    assert {p: p.stat().st_mtime_ns for p in full_checkpoints} == full_checkpoints  # finished run not redone
    assert json.loads((lowrank / "summary.json").read_text())["resumed_from"] == stopped["step"]
    straight = next(r for r in plan_runs(small_study(seeds=[0], steps=40, checkpoint_steps=(), slower=True))
                    if r.method == "lowrank")
    train(straight.config, tmp_path / "straight")
    a, b = final_weights(tmp_path / "straight"), final_weights(lowrank)
    assert all(torch.equal(a[key], b[key]) for key in a)
