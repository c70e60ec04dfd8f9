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

import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rankscope.errors import ConfigError, did_you_mean
from rankscope.study.jobs import Job

LAUNCHERS = ("local", "submitit-local", "slurm")

# What torchrun (and submitit's TorchDistributedEnvironment) put in a process's environment to
# make it one rank of a process group. A study's jobs must not inherit them from the driver: a
# local worker would join a group that does not exist, and a SLURM job would reuse one port
# for every multi-GPU job (submitit takes MASTER_PORT from the environment when it is set).
DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                   "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                   "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE")

# How long before its time limit a SLURM job is signalled (USR2), by the largest model of the
# study (parameters, signal delay in seconds). In that time the run finishes its current step, then
# writes, fsyncs and hashes a checkpoint of its weights and optimizer state (12 bytes per parameter
# with AdamW in fp32: 1B is ~16 GB, 7B ~81 GB) on a shared file system, and submitit requeues it
# (measured on CPU by benchmarks/requeue_stop_time.py: 60m's 0.4 GB took 2.6 s besides its step).
# A job still writing when SLURM kills it would end TIMEOUT, never requeued; SubmititJob.checkpoint
# therefore requeues it anyway before then, and it resumes from its last complete checkpoint.
SIGNAL_DELAYS = ((1_000_000_000, 600), (300_000_000, 240), (0, 90))
# The default CPU cores of one GPU task (--slurm-cpus-per-gpu): data loading is a memmap, but the
# host builds the model, runs the analysis' CPU parts and loads checkpoints.
DEFAULT_CPUS_PER_GPU = 8


def signal_delay_for(params: int | None) -> int:
    """The default signal delay (seconds) for a study whose largest model has `params` parameters."""
    return next(delay for size, delay in SIGNAL_DELAYS if (params or 0) >= size)


def mem_per_gpu_for(params: int | None) -> str:
    """The default host memory of one GPU task: the fp32 model built on the host (4 bytes per
    parameter) and a resumed checkpoint read into host memory (weights and AdamW state, 12 more),
    plus 8 GB for Python, torch and CUDA, rounded up to 16 GB."""
    gigabytes = 16 * (params or 0) / 1e9 + 8
    return f"{max(16, 16 * math.ceil(gigabytes / 16))}G"


def without_distributed_env(environ: dict[str, str] | os._Environ) -> list[str]:
    """Remove DISTRIBUTED_ENV from `environ`; returns the names that were there."""
    removed = [name for name in DISTRIBUTED_ENV if name in environ]
    for name in removed:
        del environ[name]
    return removed


@dataclass
class LaunchOptions:
    launcher: str = "local"
    workers: int | None = None  # runs at a time (None: local -> cores or GPUs; slurm -> no limit)
    threads: int | None = None  # torch CPU threads per job (None: 1 on CPU; slurm: --cpus-per-task)
    time: str | None = None  # job time limit: minutes, H:M:S, D-H:M:S... (slurm, submitit-local)
    gpus_per_run: int | None = None  # slurm: GPUs (= DDP processes) per training run, default 1
    gpus_per_node: int | None = None  # slurm: GPUs of one node a run may use (None: all its GPUs on one node)
    nodes: int | None = None  # slurm: nodes per training run (None: ceil(gpus_per_run / gpus_per_node))
    cpus_per_gpu: int | None = None  # slurm: CPU cores per GPU task (None: DEFAULT_CPUS_PER_GPU)
    mem_per_gpu: str | None = None  # slurm: host memory per GPU task, e.g. 64G (None: from the model size)
    partition: str | None = None
    account: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # free-form sbatch options
    tasks_per_run: int | None = None  # processes per training run without GPUs (CPU DDP, tests)
    # How long before the time limit a job is told (USR2) to checkpoint and requeue; None: scaled
    # to the study's largest model (signal_delay_for).
    signal_delay_s: int | None = None
    max_requeues: int = 50  # time limits a run may reach before it counts as failed
    dry_run: bool = False

    def validate(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"unknown launcher {self.launcher!r}{did_you_mean(self.launcher, LAUNCHERS)} "
                              f"(choose one of {', '.join(LAUNCHERS)})")
        for name in ("workers", "threads", "gpus_per_run", "tasks_per_run", "gpus_per_node", "nodes", "cpus_per_gpu",
                     "signal_delay_s"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "gpus_per_run" else 1):
                raise ConfigError(f"--{_flag(name)} must be at least {0 if name == 'gpus_per_run' else 1}, got {value}")
        slurm_only = {"partition": self.partition, "account": self.account, "extra": self.extra,
                      "gpus-per-node": self.gpus_per_node, "nodes": self.nodes, "cpus-per-gpu": self.cpus_per_gpu,
                      "mem-per-gpu": self.mem_per_gpu}
        given = [name for name, value in slurm_only.items() if value]
        if given and self.launcher != "slurm":
            raise ConfigError(f"--slurm-{given[0]} applies to --launcher slurm, not {self.launcher}")
        if self.launcher == "local":
            timed = {"--slurm-time": self.time, "--slurm-gpus-per-run": self.gpus_per_run,
                     "--slurm-signal-delay": self.signal_delay_s}
            option = next((flag for flag, value in timed.items() if value is not None), None)
            if option:
                raise ConfigError(f"{option} applies to --launcher slurm or submitit-local, not local")
        if self.time is not None:
            self.time_minutes()
        if self.mem_per_gpu is not None and not re.fullmatch(r"\d+[KMGT]?B?", self.mem_per_gpu.strip(), re.IGNORECASE):
            raise ConfigError(f"--slurm-mem-per-gpu {self.mem_per_gpu!r} is not a memory size; use e.g. 64G or 500000M")
        if self.signal_delay_s is not None and self.signal_delay_s >= self.time_minutes() * 60:
            raise ConfigError(f"--slurm-signal-delay {self.signal_delay_s} s must be shorter than the time limit "
                              f"({self.time_minutes():g} min)")
        if self.launcher == "slurm":
            self.layout()

    def time_minutes(self) -> float:
        """The job time limit in minutes (SLURM's formats; default 4 hours)."""
        return parse_time_minutes(self.time) if self.time is not None else 240.0

    def layout(self) -> tuple[int, int]:
        """(nodes, GPUs per node) of one training run. A run that fits one node stays on one; a
        larger one spans whole nodes of `gpus_per_node` GPUs (DDP ranks are spread evenly)."""
        per_node = self.gpus_per_node
        if self.gpus_per_run is not None:
            gpus = self.gpus_per_run
        elif self.nodes is not None:
            if per_node is None:
                raise ConfigError("--slurm-nodes needs --slurm-gpus-per-node (or --slurm-gpus-per-run)")
            gpus = self.nodes * per_node
        else:
            gpus = 1
        if gpus == 0:
            if (self.nodes or 1) > 1:
                raise ConfigError("--slurm-nodes above 1 needs GPUs: a CPU run stays on one node")
            return 1, 0
        if self.nodes is not None and per_node is None:
            if gpus % self.nodes:
                raise ConfigError(f"--slurm-gpus-per-run {gpus} does not split evenly over --slurm-nodes {self.nodes}")
            per_node = gpus // self.nodes
        if per_node is None or gpus <= per_node:
            nodes = 1
            per_node = gpus
        else:
            if gpus % per_node:
                raise ConfigError(f"--slurm-gpus-per-run {gpus} does not fill whole nodes of --slurm-gpus-per-node "
                                  f"{per_node}; use a multiple of {per_node}")
            nodes = gpus // per_node
        if self.nodes is not None and self.nodes != nodes:
            raise ConfigError(f"--slurm-nodes {self.nodes} disagrees with {gpus} GPUs per run at {per_node} per node "
                              f"({nodes} node(s)); give two of the three")
        return nodes, per_node


def _flag(name: str) -> str:
    slurm = {"gpus_per_run", "gpus_per_node", "nodes", "cpus_per_gpu", "signal_delay_s"}
    text = name.removesuffix("_s").replace("_", "-")
    return f"slurm-{text}" if name in slurm else text


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


# Called with a job and its record (Handle.record) once the scheduler has accepted it.
Submitted = Callable[[Job, dict[str, Any]], None]


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
    def submit(self, stage: str, jobs: list[Job], on_submitted: Submitted | None = None) -> dict[str, Handle]:
        """Start (or queue) the jobs of one stage; returns a handle per job name. A launcher whose
        jobs outlive the driver calls `on_submitted(job, record)` as soon as the scheduler has
        taken a job, so that its id is on disk before anything else can go wrong."""

    def attach(self, record: dict[str, Any]) -> Handle | None:
        """A handle on a job submitted by an earlier driver, if that job is still queued or running."""
        return None

    def find_submitted(self, stage: str, jobs: list[Job]) -> dict[str, Handle]:
        """Handles on jobs of `jobs` that the scheduler still has queued or running although no
        record names them (an earlier driver died between submitting them and recording their ids)."""
        return {}

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
