"""The submitit launchers: `slurm` (one SLURM job per study job, a job array per stage) and
`submitit-local` (the same submitit jobs as subprocesses of this machine, no SLURM).

Inside a job, `SubmititJob` runs the study job in a thread while the main thread waits for
signals. When SLURM announces preemption or the time limit (USR2, `signal_delay_s` before the
end), submitit calls `SubmititJob.checkpoint` (its Checkpointable protocol): we ask the training
run to stop after its current step, wait while it writes that step's checkpoint, and hand submitit
a fresh copy of the job to requeue. The requeued job resumes the run from that checkpoint, bit for
bit. A training run on several GPUs is one job with one task per GPU; every task gets the
environment torchrun would give it (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK), so the
trainer takes its usual DDP path.

Job ids go to jobs.json as soon as sbatch has taken them (`on_submitted`): a new driver follows the
jobs an earlier one submitted instead of submitting them again, and before submitting it asks
squeue for jobs of the stage that no record names (a driver that died in between), identified by
the study job pickled in their submitit folder.

Jobs never inherit the driver's rendezvous variables (DISTRIBUTED_ENV): submitit would reuse an
inherited MASTER_PORT for every multi-GPU job, and a one-GPU job would try to join a group.
"""

from __future__ import annotations

import getpass
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rankscope.errors import RankscopeError
from rankscope.study.jobs import Job, execute_job
from rankscope.study.launch import (
    DEFAULT_CPUS_PER_GPU,
    DISTRIBUTED_ENV,
    Handle,
    Launcher,
    LaunchOptions,
    Submitted,
    cpu_count,
    mem_per_gpu_for,
    signal_delay_for,
)
from rankscope.study.status import error_line

log = logging.getLogger("rankscope.study")

# Seconds between the driver's looks at SLURM jobs: sacct is shared by every user of the cluster.
SLURM_POLL_S = 10.0
# Of the signal delay, what `checkpoint` leaves to submitit after the run stopped: dumping the
# requeued job and `scontrol requeue` (at most a third of the delay).
REQUEUE_MARGIN_S = 30.0


def checkpoint_wait_s(signal_delay_s: float) -> float:
    """How long `SubmititJob.checkpoint` waits for the run to stop and write its checkpoint."""
    return max(1.0, signal_delay_s - min(REQUEUE_MARGIN_S, signal_delay_s / 3))


def requeue_cut_short(exc: subprocess.CalledProcessError) -> bool:
    """Whether submitit's `scontrol requeue` was killed by a signal (the requeue's own end of the
    job) rather than refused by SLURM (a non-zero exit status: no requeue)."""
    command = exc.cmd if isinstance(exc.cmd, (list, tuple)) else str(exc.cmd).split()
    return list(command[:2]) == ["scontrol", "requeue"] and exc.returncode < 0


class SubmititJob:
    """What submitit runs: one study job, checkpointable (submitit calls `checkpoint` on USR2)."""

    def __init__(self, job: Job, study_dir: str, threads: int | None, signal_delay_s: int = signal_delay_for(0)):
        self.job = job
        self.study_dir = study_dir
        self.threads = threads
        self.signal_delay_s = signal_delay_s
        self._thread: threading.Thread | None = None
        self._result: Any = None
        self._error: BaseException | None = None

    def __call__(self) -> Any:
        import submitit
        import torch

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # one process per GPU: the environment torchrun gives its workers
            # Every task keeps every GPU of its node visible; the trainer picks cuda:LOCAL_RANK.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        torch.set_num_threads(self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
        self._thread = threading.Thread(target=self._work, args=(env.global_rank,), daemon=True)
        try:
            self._thread.start()
            while self._thread.is_alive():  # the main thread stays free to run submitit's signal handler
                self._thread.join(0.2)
        except subprocess.CalledProcessError as exc:
            if not requeue_cut_short(exc):
                raise
            # SLURM ends a requeued job at once, and `scontrol requeue` (submitit runs it from the
            # signal handler, here) is part of the job: it may be killed before it exits. The
            # requeue went through; raising would make submitit write an error result, and the
            # driver would take the requeued job for finished.
            log.info("%s/%s: requeued (the job ended while scontrol was exiting)", self.job.stage, self.job.name)
            sys.exit(-1)  # what submitit's own handler does after a requeue: no result file
        if self._error is not None:
            raise self._error
        return self._result

    def _work(self, rank: int) -> None:
        try:
            self._result = execute_job(self.job, self.study_dir, rank=rank)
        except BaseException as exc:  # re-raised in the main thread
            self._error = exc

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Preemption or time limit: let a training run checkpoint its current step, then requeue.

        SLURM kills the job `signal_delay_s` after the signal, and submitit requeues it only once
        this returns, so the wait is bounded: a run still stopping by then (a long step, a
        validation pass, a slow file system) is requeued anyway and resumes from its last intact
        checkpoint (checkpoints are written atomically), instead of ending TIMEOUT, never requeued.
        """
        import submitit

        from rankscope.train.preemption import request_stop

        request_stop()
        if self._thread is not None and self.job.stops_gracefully:
            wait = checkpoint_wait_s(self.signal_delay_s)
            started = time.monotonic()
            self._thread.join(wait)
            if self._thread.is_alive():
                log.warning("%s/%s: did not stop within %.0f s of the signal; requeued anyway, it resumes from its last "
                            "complete checkpoint (a longer --slurm-signal-delay gives it more time)",
                            self.job.stage, self.job.name, wait)
            else:
                log.info("%s/%s: stopped and checkpointed %.1f s after the signal", self.job.stage, self.job.name,
                         time.monotonic() - started)
        return submitit.helpers.DelayedSubmission(SubmititJob(self.job, self.study_dir, self.threads, self.signal_delay_s))

    def __getstate__(self) -> dict:
        return {"job": self.job, "study_dir": self.study_dir, "threads": self.threads,
                "signal_delay_s": self.signal_delay_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["job"], state["study_dir"], state["threads"], state.get("signal_delay_s", signal_delay_for(0)))


class SubmititHandle(Handle):
    def __init__(self, launcher: str, job: Any = None, pid: int | None = None):
        self.launcher = launcher
        self.job = job  # a submitit Job once submitted
        self.pid = pid  # submitit-local, followed by a new driver: the job's controller process

    @property
    def record(self) -> dict[str, Any] | None:
        if self.job is None:
            return None
        return {"launcher": self.launcher, "job_id": str(self.job.job_id), "folder": str(self.job.paths.folder)}

    def finished(self) -> bool:
        if self.job is None:
            return False
        if self.pid is not None:
            return not _process_running(self.pid)
        return self.job.done()

    def failure(self) -> str | None:
        result_file = self.job.paths.result_pickle
        try:
            with open(result_file, "rb") as handle:
                kind, value = pickle.load(handle)
            if kind == "error":
                lines = [line for line in str(value).strip().splitlines() if line.strip()]
                return f"job {self.job.job_id} failed: {lines[-1] if lines else 'no traceback'} (log: {self.job.paths.stderr})"
        except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError):
            pass
        state = self.job.state if self.pid is None else "ended"
        return f"job {self.job.job_id} ended ({state}) without a result; see {self.job.paths.stderr}"


class SubmititLauncher(Launcher):
    def __init__(self, study_dir: Path, options: LaunchOptions, study_name: str, model_params: int | None = None):
        import submitit

        self.name = options.launcher
        self.options = options
        self.study_dir = Path(study_dir)
        self.study_name = study_name
        self.folder = self.study_dir / "submitit" / "%j"
        self.limit = options.workers or (cpu_count() if self.name == "submitit-local" else None)
        self.model_params = model_params  # the study's largest model: default signal delay and memory
        if options.signal_delay_s is not None:
            self.signal_delay_s = options.signal_delay_s
        else:  # never at or before the job's start
            self.signal_delay_s = min(signal_delay_for(model_params), int(options.time_minutes() * 60) // 2)
        if self.name == "slurm":
            self.poll_interval = SLURM_POLL_S
            if not options.dry_run:
                executor_class = submitit.SlurmExecutor
                if executor_class.affinity() < 0:
                    raise RankscopeError(
                        "--launcher slurm needs SLURM's srun/sbatch on this machine (run the study from a login "
                        "node); --dry-run shows the sbatch parameters, --launcher submitit-local runs the same jobs here"
                    )
                self.executor = executor_class(folder=self.folder, max_num_timeout=options.max_requeues)
        elif not options.dry_run:
            self.executor = submitit.LocalExecutor(folder=self.folder, max_num_timeout=options.max_requeues)
        self.queued: deque[tuple[str, SubmititJob, SubmititHandle, Job, Submitted | None]] = deque()
        self.running: list[SubmititHandle] = []

    # -- parameters --------------------------------------------------------------------------

    def _shape(self, stage: str) -> tuple[int, int, int]:
        """(nodes, tasks per node, GPUs per node) of one job of the stage: a training run may span
        GPUs and nodes (one task per GPU); analysis and eval use one GPU."""
        if self.name == "slurm":
            nodes, gpus = self.options.layout()
        else:
            nodes, gpus = 1, self.options.gpus_per_run or 0
        if stage not in ("train", "tune"):
            return 1, 1, min(gpus, 1)
        return nodes, (gpus or self.options.tasks_per_run or 1), gpus

    def job_name(self, stage: str) -> str:
        return f"rankscope-{self.study_name}-{stage}"

    def parameters(self, stage: str, count: int) -> dict[str, Any]:
        nodes, tasks, gpus = self._shape(stage)
        minutes = self.options.time_minutes()
        if self.name == "submitit-local":
            return {"timeout_min": minutes, "tasks_per_node": tasks, "gpus_per_node": gpus,
                    "signal_delay_s": self.signal_delay_s}
        params: dict[str, Any] = {
            "job_name": self.job_name(stage), "time": max(1, round(minutes)), "nodes": nodes,
            "ntasks_per_node": tasks, "signal_delay_s": self.signal_delay_s,
        }
        if gpus:
            # Without these a task gets the site's defaults, often 1 core (one torch thread, set
            # from SLURM_CPUS_PER_TASK) and a few GB, less than building the model on the host takes.
            params["gpus_per_node"] = gpus
            params["cpus_per_task"] = self.options.cpus_per_gpu or DEFAULT_CPUS_PER_GPU
            params["mem_per_gpu"] = (self.options.mem_per_gpu or mem_per_gpu_for(self.model_params)).strip()
        elif self.options.threads:
            params["cpus_per_task"] = self.options.threads
        if self.options.partition:
            params["partition"] = self.options.partition
        if self.options.account:
            params["account"] = self.options.account
        if self.limit:
            params["array_parallelism"] = min(self.limit, max(count, 1))
        extra = dict(self.options.extra)
        if extra:
            # An option given as --slurm-extra replaces ours (one #SBATCH line each); any memory
            # option replaces the per-GPU default (SLURM takes only one of them).
            given = {key.replace("-", "_") for key in extra}
            for key in given & set(params):
                del params[key]
            if given & {"mem", "mem_per_cpu", "mem_per_gpu"}:
                params.pop("mem_per_gpu", None)
            params["additional_parameters"] = extra
        cpus = extra.get("cpus-per-task", extra.get("cpus_per_task", params.get("cpus_per_task")))
        if cpus:
            # srun of SLURM 22.05 to 23.02 does not pass --cpus-per-task on from sbatch.
            params["srun_args"] = [f"--cpus-per-task={cpus}"]
        return params

    def describe(self, stage: str, jobs: list[Job]) -> str:
        names = ", ".join(job.name for job in jobs)
        if self.name == "submitit-local":
            _, tasks, gpus = self._shape(stage)
            return (f"stage {stage}: {len(jobs)} submitit-local job(s), at most {self.limit} at a time, "
                    f"{tasks} task(s) and {gpus} GPU(s) each ({names})")
        shape = f"one job array of {len(jobs)} jobs" if len(jobs) > 1 else "one job"
        return (f"stage {stage}: {shape} ({names})\n"
                + sbatch_text(self.folder, self.parameters(stage, len(jobs)), len(jobs)))

    # -- submission ---------------------------------------------------------------------------

    def _wrap(self, job: Job, threads: int | None) -> SubmititJob:
        return SubmititJob(job, str(self.study_dir), threads, self.signal_delay_s)

    def submit(self, stage: str, jobs: list[Job], on_submitted: Submitted | None = None) -> dict[str, Handle]:
        handles = {job.name: SubmititHandle(self.name) for job in jobs}
        if not jobs:
            return handles
        threads = self.options.threads or (1 if self.name == "submitit-local" else None)
        if self.name == "slurm":
            self.executor.update_parameters(**self.parameters(stage, len(jobs)))
            try:
                with _submission_environment(), self.executor.batch():  # one job array per stage
                    submitted = [self.executor.submit(self._wrap(job, threads)) for job in jobs]
            except Exception as exc:  # sbatch refused (bad partition, account, time...): say so in one line
                raise RankscopeError(f"sbatch refused the {stage} jobs: {error_line(exc)}; check the --slurm-* "
                                     "options (--dry-run prints what is submitted)") from None
            for job, sub in zip(jobs, submitted):
                handles[job.name].job = sub
                if on_submitted is not None:
                    on_submitted(job, handles[job.name].record)
            log.info("stage %s: submitted job array %s (%d jobs)", stage, str(submitted[0].job_id).split("_")[0], len(jobs))
        else:
            for job in jobs:
                self.queued.append((stage, self._wrap(job, threads), handles[job.name], job, on_submitted))
            self._start_queued()
        return handles

    def _start_queued(self) -> None:
        """submitit-local starts every submitted job at once; keep at most `limit` running."""
        self.running = [h for h in self.running if not h.finished()]
        while self.queued and len(self.running) < self.limit:
            stage, callable_, handle, job, on_submitted = self.queued.popleft()
            self.executor.update_parameters(**self.parameters(stage, 1))
            with _submission_environment():
                handle.job = self.executor.submit(callable_)
            if on_submitted is not None:
                on_submitted(job, handle.record)
            self.running.append(handle)

    def poll(self) -> None:
        if self.queued:
            self._start_queued()

    def attach(self, record: dict[str, Any]) -> Handle | None:
        if record.get("launcher") != self.name or not record.get("job_id"):
            return None
        import submitit

        if self.name == "slurm":
            job = submitit.SlurmJob(folder=self.folder, job_id=record["job_id"])
            return None if job.done() else SubmititHandle(self.name, job)
        # submitit-local: the job id is the pid of the job's controller process, which outlives
        # the driver that started it.
        pid = int(record["job_id"])
        if not _process_running(pid, command="submitit.local._local"):
            return None
        job = submitit.LocalJob(folder=self.folder, job_id=record["job_id"])
        handle = SubmititHandle(self.name, job, pid=pid)
        self.running.append(handle)
        return handle

    def find_submitted(self, stage: str, jobs: list[Job]) -> dict[str, Handle]:
        """SLURM jobs of this stage that squeue still lists and whose submitit folder holds one of
        `jobs` (same name and fingerprint): submitted by a driver that died before recording them."""
        if self.name != "slurm" or not jobs:
            return {}
        import submitit

        try:
            user = [f"--user={getpass.getuser()}"]
        except Exception:  # no login name (a container without a passwd entry): the name and folder still decide
            user = []
        command = ["squeue", "--noheader", "--array", *user, f"--name={self.job_name(stage)}", "--format=%i"]
        try:
            listed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout.split()
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("cannot list this study's queued jobs (%s: %s); a job an earlier driver submitted without "
                        "recording it would run twice", " ".join(command[:1]), error_line(exc))
            return {}
        wanted = {job.name: job for job in jobs}
        found: dict[str, Handle] = {}
        for job_id in listed:
            queued = self._submitted_job(job_id)
            match = wanted.get(queued.name) if queued is not None else None
            if match is None or queued.stage != stage or queued.fingerprint() != match.fingerprint() or match.name in found:
                continue
            found[match.name] = SubmititHandle(self.name, submitit.SlurmJob(folder=self.folder, job_id=job_id))
        return found

    def _submitted_job(self, job_id: str) -> Job | None:
        """The study job that SLURM job `job_id` runs, read from its submitit folder (None: not
        one of this study's, or its pickle is not there yet)."""
        from submitit.core.utils import DelayedSubmission, JobPaths

        path = JobPaths(self.folder, job_id=job_id).submitted_pickle
        try:
            delayed = DelayedSubmission.load(path)
        except Exception:  # missing, half-written or another program's pickle: not ours to follow
            return None
        function = getattr(delayed, "function", None)
        return function.job if isinstance(function, SubmititJob) else None

    def interrupt(self) -> str:
        self.queued.clear()
        return (f"the {self.name} jobs already started keep running; run the same command again to follow "
                "them and submit the rest")


@contextmanager
def _submission_environment() -> Iterator[None]:
    """The driver's environment without DISTRIBUTED_ENV while sbatch (or submitit-local) copies it
    into a job: a driver started under torchrun, or from a shell that exported MASTER_PORT, must
    not hand its rendezvous to every job."""
    saved = {name: os.environ.pop(name) for name in DISTRIBUTED_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def sbatch_text(folder: Path, parameters: dict[str, Any], count: int) -> str:
    """The #SBATCH lines and the srun command of the array submitit would submit."""
    from submitit.slurm.slurm import SlurmExecutor

    class _Rendering(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:  # render without SLURM installed
            return 1

    executor = _Rendering(folder=folder)
    executor.update_parameters(**parameters)
    if count > 1:
        executor.parameters["map_count"] = count
    text = executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")
    return "\n".join(line for line in text.splitlines() if line.startswith(("#SBATCH", "srun", "export")))


def _process_running(pid: int, command: str | None = None) -> bool:
    """Alive, not a zombie (finished, not yet reaped), and (if given) running `command`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():  # not Linux: trust kill(0)
        return True
    try:
        if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return command is None or command in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
