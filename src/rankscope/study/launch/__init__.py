"""Launchers: where the jobs of a study run.

- `local` (default): a pool of worker processes on this machine (`--workers N`, default one per
  CPU core with one torch thread each, or one per GPU).
- `submitit-local`: each job is a submitit job on this machine (real subprocesses, the SLURM code
  path without SLURM: signals, checkpoint and requeue); used by the tests.
- `slurm`: each job is a SLURM job submitted through submitit, one job array per stage.

A launcher only starts jobs and says when they have ended; what a job did is in its outcome
file (study/status.py), written by `execute_job` wherever the job ran.

This module holds what every launcher shares (options, Handle, Launcher); the launchers import
it, and `factory.make_launcher` picks one, so the package never imports its own launchers.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from rankscope.errors import ConfigError, did_you_mean
from rankscope.study.jobs import Job

LAUNCHERS = ("local", "submitit-local", "slurm")


@dataclass
class LaunchOptions:
    launcher: str = "local"
    workers: int | None = None  # runs at a time (None: local -> cores or GPUs; slurm -> no limit)
    threads: int | None = None  # torch CPU threads per job (None: 1 on CPU; slurm: --cpus-per-task)
    time: str | None = None  # job time limit: minutes, H:M:S, D-H:M:S... (slurm, submitit-local)
    gpus_per_run: int | None = None  # slurm: GPUs (= DDP processes) per training run, default 1
    partition: str | None = None
    account: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # free-form sbatch options
    tasks_per_run: int | None = None  # processes per training run without GPUs (CPU DDP, tests)
    signal_delay_s: int = 90  # how long before the time limit a job is told to checkpoint
    max_requeues: int = 50  # time limits a run may reach before it counts as failed
    dry_run: bool = False

    def validate(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"unknown launcher {self.launcher!r}{did_you_mean(self.launcher, LAUNCHERS)} "
                              f"(choose one of {', '.join(LAUNCHERS)})")
        for name in ("workers", "threads", "gpus_per_run", "tasks_per_run"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "gpus_per_run" else 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be at least "
                                  f"{0 if name == 'gpus_per_run' else 1}, got {value}")
        slurm_only = {"partition": self.partition, "account": self.account, "extra": self.extra}
        given = [name for name, value in slurm_only.items() if value]
        if given and self.launcher != "slurm":
            raise ConfigError(f"--slurm-{given[0]} applies to --launcher slurm, not {self.launcher}")
        if self.launcher == "local" and (self.time is not None or self.gpus_per_run is not None):
            option = "--slurm-time" if self.time is not None else "--slurm-gpus-per-run"
            raise ConfigError(f"{option} applies to --launcher slurm or submitit-local, not local")
        if self.time is not None:
            self.time_minutes()

    def time_minutes(self) -> float:
        """The job time limit in minutes (SLURM's formats; default 4 hours)."""
        return parse_time_minutes(self.time) if self.time is not None else 240.0


def parse_time_minutes(text: str) -> float:
    """SLURM time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not match:
        raise ConfigError(f"--slurm-time {text!r} is not a time limit; use minutes (90), H:M:S (1:30:00) or D-H:M:S")
    days, first, second, third = match.groups()
    parts = [int(p) for p in (first, second, third) if p is not None]
    if days is not None:
        hours, minutes, seconds = (parts + [0, 0])[:3]
        total = int(days) * 1440 + hours * 60 + minutes + seconds / 60
    elif len(parts) == 1:
        total = parts[0]
    elif len(parts) == 2:
        total = parts[0] + parts[1] / 60
    else:
        total = parts[0] * 60 + parts[1] + parts[2] / 60
    if total <= 0:
        raise ConfigError(f"--slurm-time {text!r} must be positive")
    return float(total)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Handle(ABC):
    """One submitted job, as the driver follows it."""

    @property
    def record(self) -> dict[str, Any] | None:
        """What to persist in jobs.json so that another driver can follow the job (None: nothing)."""
        return None

    @abstractmethod
    def finished(self) -> bool:
        """The job is no longer queued nor running (whatever its outcome)."""

    def failure(self) -> str | None:
        """Why the job ended, when it ended without writing its outcome (killed, out of memory...)."""
        return None


class Launcher(ABC):
    name: str
    poll_interval: float = 0.5  # seconds between looks at the running jobs

    @abstractmethod
    def submit(self, stage: str, jobs: list[Job]) -> dict[str, Handle]:
        """Start (or queue) the jobs of one stage; returns a handle per job name."""

    def attach(self, record: dict[str, Any]) -> Handle | None:
        """A handle on a job submitted by an earlier driver, if that job is still queued or running."""
        return None

    def poll(self) -> None:  # noqa: B027 - optional: a launcher without news to collect keeps it
        """Advance: collect news from the jobs, start queued ones."""

    @abstractmethod
    def describe(self, stage: str, jobs: list[Job]) -> str:
        """What `--dry-run` prints for a stage: how the jobs would be started."""

    def interrupt(self) -> str:
        """The driver is stopping (Ctrl-C); returns one line saying what happens to the jobs."""
        return "jobs stopped"

    def close(self) -> None:  # noqa: B027 - optional: a launcher without workers keeps it
        """Release workers; called once when the study ends."""
