"""The submitit launchers without SLURM: submitit-local end to end, a preempted run requeued and
resumed bit for bit, a new driver following the jobs of a killed one, and the sbatch dry run."""

import json
import os
import signal
import threading

import pytest
import torch
from study_helpers import (
    final_weights,
    last_logged_step,
    read_outcome,
    small_study,
    small_study_dict,
    start_driver,
    wait_for,
    write_study,
)

from rankscope.cli import main
from rankscope.study import LaunchOptions, plan_runs, run_study
from rankscope.train import checkpoint as ckpt
from rankscope.train import train

pytestmark = pytest.mark.slow

SUBMITIT_LOCAL = dict(launcher="submitit-local", workers=2)


def test_submitit_local_runs_the_whole_study_as_jobs(tmp_path):
    spec = small_study(seeds=[0])
    out = tmp_path / "study"
    result = run_study(None, out, spec=spec, launch=LaunchOptions(**SUBMITIT_LOCAL))
    assert result["failed"] == [] and (out / "report" / "report.md").is_file()
    status = json.loads((out / "status.json").read_text())
    assert {run: sorted(stages) for run, stages in status.items()} == {
        "full-tiny-s0": ["analyze", "eval", "train"], "lowrank-tiny-s0": ["analyze", "eval", "train"]}
    assert all(stage["state"] == "done" for run in status.values() for stage in run.values())
    # Every job went through submitit: its id is recorded, its submitit folder and our log exist.
    records = json.loads((out / "jobs.json").read_text())
    assert set(records) == {"train/full-tiny-s0", "train/lowrank-tiny-s0", "analyze/tiny-s0",
                            "eval/full-tiny-s0", "eval/lowrank-tiny-s0"}
    for key, record in records.items():
        assert record["launcher"] == "submitit-local"
        assert (out / "submitit" / record["job_id"]).is_dir()
        stage, name = key.split("/")
        assert "started on" in (out / "logs" / stage / f"{name}.log").read_text()
    # The launcher changes where a run computes, not what: same weights as a run in this process.
    reference = plan_runs(spec)[0]
    train(reference.config, tmp_path / "here")
    a, b = final_weights(tmp_path / "here"), final_weights(out / "runs" / reference.name)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_preempted_job_is_requeued_and_resumes_bit_for_bit(tmp_path):
    spec = small_study(methods=["full"], seeds=[0], steps=40, checkpoint_steps=(), slower=True)
    out = tmp_path / "study"
    run_dir = out / "runs" / "full-tiny-s0"
    driver_result = {}
    driver = threading.Thread(target=lambda: driver_result.update(
        run_study(None, out, stages=("train",), spec=spec, launch=LaunchOptions(**SUBMITIT_LOCAL))))
    driver.start()
    try:
        running = wait_for(lambda: (o := read_outcome(out, "train", "full-tiny-s0")) and o["state"] == "running" and o,
                           240, "the training job to start")
        wait_for(lambda: last_logged_step(run_dir) >= 3, 240, "step 3")
        os.kill(running["pid"], signal.SIGUSR2)  # what SLURM sends before preemption or the time limit
    finally:
        driver.join(600)
    assert driver_result["failed"] == []
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 3 <= summary["resumed_from"] < 40  # stopped mid-run, resumed from the step it stopped at
    log = (out / "logs" / "train" / "full-tiny-s0.log").read_text()
    assert log.count("started on") == 2 and f"stopped on request after step {summary['resumed_from']}" in log
    # Its preemption checkpoint served the resume and is gone: analysis sees the schedule's steps.
    assert [c.step for c in ckpt.list_checkpoints(run_dir, include_preemption=True)] == [40]

    straight = plan_runs(spec)[0].config
    train(straight, tmp_path / "straight")
    a, b = final_weights(tmp_path / "straight"), final_weights(run_dir)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_new_driver_follows_the_jobs_of_a_killed_one(tmp_path, caplog):
    spec = small_study_dict(seeds=[0], steps=30, checkpoint_steps=(15,), slower=True)
    study_file = write_study(tmp_path / "s.yaml", spec)
    out = tmp_path / "study"
    first = start_driver([str(study_file), "--out", str(out), "--stage", "train", "--launcher", "submitit-local",
                          "--workers", "1"])
    try:  # killed as soon as its first job is submitted (the job takes seconds just to start)
        wait_for(lambda: (out / "jobs.json").is_file() or first.poll() is not None, 240, "the first submission")
    finally:
        first.kill()  # the driver only: its submitit jobs live on, as on a cluster
        first.wait()
    records = json.loads((out / "jobs.json").read_text())
    assert set(records) == {"train/full-tiny-s0"}  # one worker: the second run was never submitted

    caplog.set_level("INFO", logger="rankscope.study")
    result = run_study(None, out, stages=("train",), spec=small_study(seeds=[0], steps=30, checkpoint_steps=(15,), slower=True),
                       launch=LaunchOptions(launcher="submitit-local", workers=1))
    assert result["failed"] == []
    assert f"train/full-tiny-s0: following job {records['train/full-tiny-s0']['job_id']}" in caplog.text
    after = json.loads((out / "jobs.json").read_text())
    assert after["train/full-tiny-s0"] == records["train/full-tiny-s0"]  # followed, not submitted again
    assert "train/lowrank-tiny-s0" in after
    full = json.loads((out / "runs" / "full-tiny-s0" / "summary.json").read_text())
    assert full["resumed_from"] == 0  # trained once, start to end, by the first job
    assert (out / "logs" / "train" / "full-tiny-s0.log").read_text().count("started on") == 1


def test_dry_run_prints_the_sbatch_parameters_and_writes_nothing(tmp_path, capsys):
    study_file = write_study(tmp_path / "s.yaml", small_study_dict(seeds=[0, 1]))
    out = tmp_path / "study"
    code = main(["study", str(study_file), "--out", str(out), "--launcher", "slurm", "--dry-run",
                 "--slurm-partition", "gpu", "--slurm-time", "2:30:00", "--slurm-gpus-per-run", "2",
                 "--slurm-account", "proj42", "--slurm-extra", "qos=high", "--slurm-extra", "cpus-per-task=8",
                 "--workers", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    stages = {block.split(":")[0]: block for block in printed.split("stage ")[1:]}
    assert set(stages) == {"prepare", "train", "analyze", "eval", "predict", "report"}
    assert "in the driver, before any job" in stages["prepare"]
    train_block = stages["train"]
    assert "one job array of 4 jobs (full-tiny-s0, lowrank-tiny-s0, full-tiny-s1, lowrank-tiny-s1)" in train_block
    for line in ("#SBATCH --array=0-3%3", "#SBATCH --partition=gpu", "#SBATCH --time=150", "#SBATCH --account=proj42",
                 "#SBATCH --gpus-per-node=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --nodes=1",
                 "#SBATCH --qos=high", "#SBATCH --cpus-per-task=8", "#SBATCH --signal=USR2@90",
                 "#SBATCH --job-name=rankscope-small-train", f"#SBATCH --output={out}/submitit/%A_%a/%A_%a_0_log.out"):
        assert line in train_block.splitlines(), line
    # --slurm-extra replaces the option rankscope sets itself: one line, and srun gets the same value.
    assert sum(line.startswith("#SBATCH --cpus-per-task") for line in train_block.splitlines()) == 1
    assert "--cpus-per-task=8 " in next(line for line in train_block.splitlines() if line.startswith("srun"))
    assert "#SBATCH --mem-per-gpu=16G" in train_block.splitlines()  # the default for a tiny model
    # Analysis (one job per preset/seed group) and eval (one per run) use one GPU and one task.
    assert "one job array of 2 jobs (tiny-s0, tiny-s1)" in stages["analyze"]
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --gpus-per-node=1", "#SBATCH --ntasks-per-node=1"):
        assert line in stages["analyze"].splitlines(), line
    assert "#SBATCH --array=0-3%3" in stages["eval"] and "#SBATCH --gpus-per-node=1" in stages["eval"]


def _sbatch_lines(tmp_path, capsys, preset: str, *args: str) -> list[str]:
    spec = small_study_dict(methods=["full"], seeds=[0])
    spec["grid"]["presets"] = [preset]
    del spec["base"]["model"]  # the preset's own size: the defaults follow it
    study_file = write_study(tmp_path / f"{preset}.yaml", spec)
    assert main(["study", str(study_file), "--out", str(tmp_path / "study"), "--stage", "train", "--launcher", "slurm",
                 "--dry-run", *args]) == 0
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("layout", [["--slurm-gpus-per-run", "8", "--slurm-gpus-per-node", "4"],
                                    ["--slurm-nodes", "2", "--slurm-gpus-per-node", "4"]])
def test_dry_run_of_a_run_over_two_nodes_of_four_gpus(tmp_path, capsys, layout):
    lines = _sbatch_lines(tmp_path, capsys, "1b", *layout, "--slurm-partition", "gpu")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem-per-gpu=32G", "#SBATCH --signal=USR2@600"):
        assert line in lines, line
    srun = next(line for line in lines if line.startswith("srun"))
    assert "--cpus-per-task=8" in srun and srun.endswith(f"-u -m submitit.core._submit {tmp_path / 'study'}/submitit/%j")


def test_the_signal_delay_and_memory_follow_the_model_unless_given(tmp_path, capsys):
    assert "#SBATCH --signal=USR2@90" in _sbatch_lines(tmp_path, capsys, "tiny")
    big = _sbatch_lines(tmp_path, capsys, "7b", "--slurm-gpus-per-run", "8")
    assert "#SBATCH --signal=USR2@600" in big and "#SBATCH --mem-per-gpu=128G" in big
    assert "#SBATCH --signal=USR2@240" in _sbatch_lines(tmp_path, capsys, "350m")
    given = _sbatch_lines(tmp_path, capsys, "7b", "--slurm-signal-delay", "900", "--slurm-mem-per-gpu", "200G",
                          "--slurm-cpus-per-gpu", "12", "--slurm-time", "1:00:00")
    for line in ("#SBATCH --signal=USR2@900", "#SBATCH --mem-per-gpu=200G", "#SBATCH --cpus-per-task=12"):
        assert line in given, line
    # The default never reaches the job's start: at most half a short time limit.
    assert "#SBATCH --signal=USR2@300" in _sbatch_lines(tmp_path, capsys, "7b", "--slurm-time", "10")
    # A memory option of the site's choice replaces the per-GPU default.
    assert not any("--mem-per-gpu" in line for line in _sbatch_lines(tmp_path, capsys, "tiny", "--slurm-extra", "mem=0"))


@pytest.mark.parametrize("args, message", [
    (["--slurm-partition", "gpu"], "--slurm-partition applies to --launcher slurm"),
    (["--slurm-gpus-per-node", "4"], "--slurm-gpus-per-node applies to --launcher slurm"),
    (["--slurm-signal-delay", "60"], "--slurm-signal-delay applies to --launcher slurm or submitit-local"),
    (["--launcher", "slurm", "--slurm-gpus-per-run", "6", "--slurm-gpus-per-node", "4"],
     "--slurm-gpus-per-run 6 does not fill whole nodes of --slurm-gpus-per-node 4"),
    (["--launcher", "slurm", "--slurm-nodes", "2"], "--slurm-nodes needs --slurm-gpus-per-node"),
    (["--launcher", "slurm", "--slurm-nodes", "3", "--slurm-gpus-per-node", "4", "--slurm-gpus-per-run", "8"],
     "--slurm-nodes 3 disagrees with 8 GPUs per run at 4 per node (2 node(s))"),
    (["--launcher", "slurm", "--slurm-mem-per-gpu", "lots"], "--slurm-mem-per-gpu 'lots' is not a memory size"),
    (["--launcher", "slurm", "--slurm-time", "5", "--slurm-signal-delay", "300"],
     "--slurm-signal-delay 300 s must be shorter than the time limit"),
    (["--launcher", "slurm", "--slurm-time", "soon"], "--slurm-time 'soon' is not a time limit"),
    (["--launcher", "slurm", "--slurm-extra", "qos"], "--slurm-extra takes KEY=VALUE"),
    (["--workers", "0"], "--workers must be at least 1"),
])
def test_bad_launch_options_fail_in_one_line_before_any_work(tmp_path, capsys, args, message):
    study_file = write_study(tmp_path / "s.yaml", small_study_dict(seeds=[0]))
    assert main(["study", str(study_file), "--out", str(tmp_path / "study"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "study" / "runs").exists()


@pytest.mark.skipif(bool(__import__("shutil").which("srun")), reason="SLURM is installed here")
def test_slurm_without_slurm_says_what_to_do(tmp_path, capsys):
    study_file = write_study(tmp_path / "s.yaml", small_study_dict(seeds=[0]))
    assert main(["study", str(study_file), "--out", str(tmp_path / "study"), "--launcher", "slurm"]) == 2
    assert "needs SLURM's srun/sbatch" in capsys.readouterr().err


@pytest.mark.distributed
def test_a_multi_process_run_is_one_job_whose_tasks_train_with_ddp_and_stop_together(tmp_path):
    """CPU stand-in for --slurm-gpus-per-run 2: two tasks of one job join one gloo process group
    (the torchrun path). Only rank 0 gets the preemption signal; both stop after the same step."""
    spec = small_study(methods=["full"], seeds=[0], steps=30, checkpoint_steps=(), slower=True)
    out = tmp_path / "study"
    run_dir = out / "runs" / "full-tiny-s0"
    driver_result = {}
    driver = threading.Thread(target=lambda: driver_result.update(run_study(
        None, out, stages=("train",), spec=spec, launch=LaunchOptions(launcher="submitit-local", workers=1, tasks_per_run=2))))
    driver.start()
    try:
        running = wait_for(lambda: (o := read_outcome(out, "train", "full-tiny-s0")) and o["state"] == "running" and o,
                           240, "the training job to start")
        wait_for(lambda: last_logged_step(run_dir) >= 3, 240, "step 3")
        os.kill(running["pid"], signal.SIGUSR2)
    finally:
        driver.join(600)
    assert driver_result["failed"] == []
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and 3 <= summary["resumed_from"] < 30
    assert (out / "logs" / "train" / "full-tiny-s0.rank1.log").is_file()

    single = train(plan_runs(spec)[0].config, tmp_path / "single")
    assert summary["val_loss"] == pytest.approx(single["val_loss"], rel=2e-4)
    losses = {json.loads(line)["step"]: json.loads(line).get("loss") for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    reference = {json.loads(line)["step"]: json.loads(line).get("loss")
                 for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()}
    assert sorted(losses) == sorted(reference)
    for step, loss in reference.items():
        if loss is not None:
            assert losses[step] == pytest.approx(loss, rel=2e-4), step
