"""A study driver is one process, whatever launched it: `rankscope study` under torchrun refuses, and
the local launcher's workers never inherit the rendezvous of a process group."""

import pytest
from study_helpers import EnvironmentJob, read_outcome, small_study_dict, wait_for, write_study

from rankscope.cli import main
from rankscope.study import LaunchOptions
from rankscope.study.launch import DISTRIBUTED_ENV
from rankscope.study.launch.local import LocalLauncher

TORCHRUN_RANK_1 = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "TORCHELASTIC_RUN_ID": "none"}


def test_rankscope_study_under_torchrun_refuses_in_one_line(tmp_path, monkeypatch, capsys):
    for name, value in TORCHRUN_RANK_1.items():
        monkeypatch.setenv(name, value)
    study_file = write_study(tmp_path / "s.yaml", small_study_dict(seeds=[0]))
    assert main(["study", str(study_file), "--out", str(tmp_path / "study")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "WORLD_SIZE=2" in error and "run it without torchrun" in error
    assert "--launcher slurm --slurm-gpus-per-run N" in error
    assert not (tmp_path / "study").exists()


@pytest.mark.slow
def test_local_workers_do_not_inherit_the_drivers_process_group(tmp_path, monkeypatch):
    for name, value in TORCHRUN_RANK_1.items():
        monkeypatch.setenv(name, value)
    launcher = LocalLauncher(tmp_path, LaunchOptions(workers=1))
    job = EnvironmentJob(stage="probe", name="env", runs=("env",), names=DISTRIBUTED_ENV + ("RANKSCOPE_CACHE",))
    try:
        [handle] = launcher.submit("probe", [job]).values()
        wait_for(lambda: launcher.poll() or handle.finished(), 120, "the worker's job")
    finally:
        launcher.close()
    outcome = read_outcome(tmp_path, "probe", "env")
    assert outcome["state"] == "done", outcome
    seen = outcome["result"]
    assert {name: seen[name] for name in DISTRIBUTED_ENV if seen[name] is not None} == {}
    assert seen["RANKSCOPE_CACHE"]  # the rest of the environment is the driver's
