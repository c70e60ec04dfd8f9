"""The `fake_slurm` fixture: SLURM's commands (tests/study/fake_slurm/fake_cluster.py) first on PATH."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest

FAKE_DIR = Path(__file__).resolve().parent / "fake_slurm"
sys.path.insert(0, str(FAKE_DIR))

import fake_cluster  # noqa: E402

# Job ids unique over the session: submitit's watcher caches the state of every id it has seen.
_FIRST_IDS = itertools.count(10_000, 10_000)


class FakeSlurm:
    """The fake cluster of one test: its job table, the tool calls, and what a test may do to a job."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir

    def jobs(self) -> dict[str, dict]:
        return fake_cluster.jobs(self.state_dir)

    def calls(self, tool: str | None = None) -> list[list[str]]:
        return [call for call in fake_cluster.calls(self.state_dir) if tool is None or call[0] == tool]

    def preempt(self, key: str) -> None:
        fake_cluster.preempt(self.state_dir, key)

    def end_time_limit_in(self, key: str, seconds: float) -> None:
        fake_cluster.end_time_limit_in(self.state_dir, key, seconds)

    def release(self) -> None:
        fake_cluster.release(self.state_dir)


@pytest.fixture
def fake_slurm(tmp_path_factory, monkeypatch):
    import submitit
    from submitit.slurm.slurm import SlurmInfoWatcher

    from rankscope.study.launch import cluster

    state_dir = tmp_path_factory.mktemp("fake-slurm")
    bin_dir = state_dir / "bin"
    bin_dir.mkdir()
    for tool in fake_cluster.TOOLS:
        script = bin_dir / tool
        script.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(FAKE_DIR)!r})\n"
                          f"from fake_cluster import main\nsys.exit(main({tool!r}, sys.argv[1:]))\n")
        script.chmod(0o755)
    with fake_cluster.table(state_dir) as data:
        data["next_id"] = next(_FIRST_IDS)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state_dir))
    monkeypatch.setattr(submitit.SlurmJob, "watcher", SlurmInfoWatcher(delay_s=2))
    monkeypatch.setattr(cluster, "SLURM_POLL_S", 0.2)
    try:
        yield FakeSlurm(state_dir)
    finally:
        fake_cluster.shut_down(state_dir)
