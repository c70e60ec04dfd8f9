"""`--launcher slurm` end to end on the fake cluster (tests/study/fake_slurm): real submitit, real
job processes, SLURM's signals, time limits and requeues imitated by local stand-ins."""

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from study_helpers import final_weights, last_logged_step, read_outcome, small_study, wait_for

from rankscope.study import Job, LaunchOptions, plan_runs, run_study
from rankscope.study.board import StudyBoard
from rankscope.study.engine import run_jobs
from rankscope.study.launch import Handle, Launcher
from rankscope.study.launch.cluster import SubmititJob, SubmititLauncher, requeue_cut_short
from rankscope.study.status import JobFiles, JobRecords, StudyStatus
from rankscope.train import train
from rankscope.train.preemption import clear_stop

pytestmark = pytest.mark.slow


class DriverKilled(BaseException):
    """The driver process dying (kill -9, a closed login shell) at a chosen point."""


def _attempt_running(fake, key: str, attempt: int, out: Path, run: str) -> bool:
    job = fake.jobs().get(key)
    outcome = read_outcome(out, "train", run)
    return bool(job and job["attempts"] == attempt and job["state"] == "RUNNING" and outcome
                and outcome["state"] == "running" and outcome["started"] >= job["start"])


def test_a_run_survives_a_preemption_and_a_time_limit_and_ends_bit_for_bit(tmp_path, monkeypatch, fake_slurm):
    spec = small_study(methods=["full"], seeds=[0], steps=40, checkpoint_steps=(), slower=True)
    run = "full-tiny-s0"
    monkeypatch.setenv("FAKE_SLURM_KILL_WAIT", "0.5")
    # Each requeue's end of the job kills submitit's scontrol before it exits (SLURM can do that
    # too): the job must still count as requeued, not as failed.
    monkeypatch.setenv("FAKE_SLURM_REQUEUE_LINGER", "1")
    # A relative study folder, and jobs that start elsewhere (sbatch --chdir): the jobs must carry
    # absolute paths.
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "study"
    run_dir = out / "runs" / run
    launch = LaunchOptions(launcher="slurm", gpus_per_run=0, time="10", signal_delay_s=6,
                           extra={"chdir": str(elsewhere)})
    result = {}
    driver = threading.Thread(target=lambda: result.update(
        run_study(None, "study", stages=("train",), spec=spec, launch=launch)))
    driver.start()
    try:
        wait_for(lambda: (out / "jobs.json").is_file(), 120, "the submission")
        key = json.loads((out / "jobs.json").read_text())[f"train/{run}"]["job_id"]
        wait_for(lambda: _attempt_running(fake_slurm, key, 1, out, run) and last_logged_step(run_dir) >= 3,
                 120, "step 3 of the first attempt")
        fake_slurm.preempt(key)  # SIGTERM and USR2 now, killed after the grace time
        wait_for(lambda: (o := read_outcome(out, "train", run)) and o["state"] == "preempted", 60, "the preemption checkpoint")
        first_stop = read_outcome(out, "train", run)["step"]
        wait_for(lambda: _attempt_running(fake_slurm, key, 2, out, run) and last_logged_step(run_dir) >= first_stop + 3,
                 120, "three steps of the requeued attempt")
        # The time limit in 5 s: USR2 comes at once (6 s before it), SIGKILL at the limit.
        fake_slurm.end_time_limit_in(key, 5)
    finally:
        driver.join(300)
    assert result["failed"] == [], json.loads((out / "status.json").read_text())
    job = wait_for(lambda: (j := fake_slurm.jobs()[key])["state"] == "COMPLETED" and j, 30, "the job's end")
    assert [h["ended"] for h in job["history"]] == ["requeue", "requeue", "COMPLETED"]
    # What submitit did: one sbatch, then each attempt asked SLURM to requeue itself.
    assert len(fake_slurm.calls("sbatch")) == 1
    assert fake_slurm.calls("scontrol") == [["scontrol", "requeue", key]] * 2
    summary = json.loads((run_dir / "summary.json").read_text())
    log = (out / "logs" / "train" / f"{run}.log").read_text()
    assert log.count("started on") == 3
    assert f"stopped on request after step {first_stop}" in log
    assert first_stop < summary["resumed_from"] < 40
    assert f"stopped on request after step {summary['resumed_from']}" in log
    assert not any(elsewhere.iterdir())  # nothing landed in the jobs' working directory

    train(plan_runs(spec)[0].config, tmp_path / "straight")
    a, b = final_weights(tmp_path / "straight"), final_weights(run_dir)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _stop_after_submission(monkeypatch) -> None:
    def killed(self):
        raise DriverKilled

    monkeypatch.setattr(SubmititLauncher, "poll", killed)


def test_job_ids_are_on_disk_as_soon_as_sbatch_returns(tmp_path, monkeypatch, fake_slurm):
    monkeypatch.setenv("FAKE_SLURM_HOLD", "1")  # queued, never started
    _stop_after_submission(monkeypatch)  # the driver dies before it looks at the jobs once
    out = tmp_path / "study"
    with pytest.raises(DriverKilled):
        run_study(None, out, stages=("train",), spec=small_study(seeds=[0]), launch=LaunchOptions(launcher="slurm", gpus_per_run=0))
    records = json.loads((out / "jobs.json").read_text())
    assert {key: record["job_id"] for key, record in records.items()} == {
        "train/full-tiny-s0": next(k for k in fake_slurm.jobs() if k.endswith("_0")),
        "train/lowrank-tiny-s0": next(k for k in fake_slurm.jobs() if k.endswith("_1"))}


def test_a_new_driver_follows_jobs_a_dying_driver_submitted_but_never_recorded(tmp_path, monkeypatch, caplog, fake_slurm):
    spec = small_study(methods=["full"], seeds=[0])
    out = tmp_path / "study"
    monkeypatch.setenv("FAKE_SLURM_HOLD", "1")
    original = JobRecords.set

    def dies(self, key, record):
        raise DriverKilled  # after sbatch took the job, before its id reached jobs.json

    monkeypatch.setattr(JobRecords, "set", dies)
    with pytest.raises(DriverKilled):
        run_study(None, out, stages=("train",), spec=spec, launch=LaunchOptions(launcher="slurm", gpus_per_run=0))
    assert not (out / "jobs.json").exists()
    [key] = fake_slurm.jobs()
    monkeypatch.setattr(JobRecords, "set", original)
    monkeypatch.delenv("FAKE_SLURM_HOLD")  # a second submission would run (and be counted below)
    fake_slurm.release()

    caplog.set_level("INFO", logger="rankscope.study")
    result = run_study(None, out, stages=("train",), spec=spec, launch=LaunchOptions(launcher="slurm", gpus_per_run=0))
    assert result["failed"] == []
    assert len(fake_slurm.calls("sbatch")) == 1  # followed, not submitted again
    assert f"train/full-tiny-s0: following job {key}, submitted by an earlier driver that did not record it" in caplog.text
    assert json.loads((out / "jobs.json").read_text())["train/full-tiny-s0"]["job_id"] == key
    wait_for(lambda: fake_slurm.jobs()[key]["state"] == "COMPLETED", 30, "the job's end")


def test_jobs_get_absolute_paths_and_no_rendezvous_of_the_driver(tmp_path, monkeypatch, fake_slurm):
    from submitit.core.utils import DelayedSubmission, JobPaths

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FAKE_SLURM_HOLD", "1")
    # A driver started from a shell that had run torchrun before, or inside another job.
    inherited = {"MASTER_PORT": "29500", "MASTER_ADDR": "node7", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    for name, value in inherited.items():
        monkeypatch.setenv(name, value)
    _stop_after_submission(monkeypatch)
    with pytest.raises(DriverKilled):
        run_study(None, "study", stages=("train",), spec=small_study(methods=["full"], seeds=[0]),
                  launch=LaunchOptions(launcher="slurm", gpus_per_run=0))
    [job] = fake_slurm.jobs().values()
    assert not set(inherited) & set(job["env"])  # what sbatch handed the job
    assert all(os.environ[name] == value for name, value in inherited.items())  # the driver's own are back
    submitted = DelayedSubmission.load(JobPaths(tmp_path / "study" / "submitit" / "%j", job_id=job["key"]).submitted_pickle)
    assert submitted.function.study_dir == str(tmp_path / "study")
    assert submitted.function.job.run_dir == str(tmp_path / "study" / "runs" / "full-tiny-s0")


@dataclass(frozen=True, kw_only=True)
class _SlowToStopJob(Job):
    stops_gracefully: ClassVar[bool] = True

    def run(self) -> dict:
        return {}

    def finished_on_disk(self) -> bool:
        return False


def test_a_run_that_does_not_stop_within_the_signal_delay_is_requeued_anyway(caplog):
    """SLURM kills the job `signal_delay` after USR2, and submitit requeues only once `checkpoint`
    returns: waiting for the run without a bound would lose the requeue (the job ends TIMEOUT)."""
    caplog.set_level("INFO", logger="rankscope.study")
    still_writing = threading.Event()
    job = SubmititJob(_SlowToStopJob(stage="train", name="big", runs=("big",)), "/study", None, signal_delay_s=3)
    job._thread = threading.Thread(target=still_writing.wait, args=(30,), daemon=True)  # a 30 s checkpoint
    job._thread.start()
    started = time.monotonic()
    try:
        requeued = job.checkpoint()
    finally:
        still_writing.set()
        clear_stop()  # the stop request is process-wide: later tests train in this process
    waited = time.monotonic() - started
    assert 1.5 < waited < 3  # the delay less a margin for submitit's own requeue
    assert isinstance(requeued.function, SubmititJob)
    assert requeued.function.job == job.job and requeued.function.signal_delay_s == 3
    assert "train/big: did not stop within 2 s of the signal; requeued anyway" in caplog.text


def test_only_a_requeue_killed_by_the_jobs_end_counts_as_requeued():
    """`scontrol requeue` killed by a signal: SLURM took the requeue and is ending the job. Exit
    status 1: SLURM refused it, and the job must end with submitit's error result."""
    assert requeue_cut_short(subprocess.CalledProcessError(-15, ["scontrol", "requeue", "10000_3"]))
    assert not requeue_cut_short(subprocess.CalledProcessError(1, ["scontrol", "requeue", "10000_3"]))
    assert not requeue_cut_short(subprocess.CalledProcessError(-9, ["sacct", "-j", "10000"]))


class _EndedAfterPreemption(Handle):
    """A job that checkpointed on a signal and then ended for good (submitit's error result)."""

    def finished(self) -> bool:
        return True

    def failure(self) -> str:
        return "job 7 failed: UncompletedJobError: Job not requeued because: timed-out too many times."


class _OneShotLauncher(Launcher):
    name = "one-shot"
    poll_interval = 0.0

    def __init__(self, study_dir: Path):
        self.study_dir = study_dir

    def submit(self, stage, jobs, on_submitted=None):
        for job in jobs:
            JobFiles(self.study_dir, job.stage, job.name).write_outcome({"state": "preempted", "step": 4})
        return {job.name: _EndedAfterPreemption() for job in jobs}

    def describe(self, stage, jobs):
        return ""


def test_a_preempted_job_that_is_not_requeued_fails_with_submitits_reason(tmp_path):
    job = _SlowToStopJob(stage="train", name="big", runs=("big",))
    status = StudyStatus(tmp_path / "status.json")
    [outcome] = run_jobs([job], _OneShotLauncher(tmp_path), tmp_path, status, StudyBoard("t", live=False)).values()
    assert outcome["state"] == "failed"
    assert outcome["error"] == ("stopped after step 4 and not resumed (job 7 failed: UncompletedJobError: Job not requeued "
                                "because: timed-out too many times.); run the study again to continue from that checkpoint")
    assert status.data["big"]["train"]["state"] == "failed"
