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

Job ids go to jobs.json (through the handles' records): a new driver follows the jobs an earlier
one submitted instead of submitting them again.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
from collections import deque
from pathlib import Path
from typing import Any

from rankscope.errors import RankscopeError
from rankscope.study.jobs import Job, execute_job
from rankscope.study.launch import Handle, Launcher, LaunchOptions, cpu_count
from rankscope.study.status import error_line

log = logging.getLogger("rankscope.study")


class SubmititJob:
    """What submitit runs: one study job, checkpointable (submitit calls `checkpoint` on USR2)."""

    def __init__(self, job: Job, study_dir: str, threads: int | None):
        self.job = job
        self.study_dir = study_dir
        self.threads = threads
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
        self._thread.start()
        while self._thread.is_alive():  # the main thread stays free to run submitit's signal handler
            self._thread.join(0.2)
        if self._error is not None:
            raise self._error
        return self._result

    def _work(self, rank: int) -> None:
        try:
            self._result = execute_job(self.job, self.study_dir, rank=rank)
        except BaseException as exc:  # re-raised in the main thread
            self._error = exc

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Preemption or time limit: let a training run checkpoint its current step, then requeue."""
        import submitit

        from rankscope.train.preemption import request_stop

        request_stop()
        if self._thread is not None and self.job.stops_gracefully:
            self._thread.join()
        return submitit.helpers.DelayedSubmission(SubmititJob(self.job, self.study_dir, self.threads))

    def __getstate__(self) -> dict:
        return {"job": self.job, "study_dir": self.study_dir, "threads": self.threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["job"], state["study_dir"], state["threads"])


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
    def __init__(self, study_dir: Path, options: LaunchOptions, study_name: str):
        import submitit

        self.name = options.launcher
        self.options = options
        self.study_dir = Path(study_dir)
        self.study_name = study_name
        self.folder = self.study_dir / "submitit" / "%j"
        self.limit = options.workers or (cpu_count() if self.name == "submitit-local" else None)
        if self.name == "slurm":
            self.poll_interval = 10.0  # sacct is shared by every user of the cluster
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
        self.queued: deque[tuple[str, Job, SubmititHandle]] = deque()
        self.running: list[SubmititHandle] = []

    # -- parameters --------------------------------------------------------------------------

    def _processes(self, stage: str) -> tuple[int, int]:
        """(tasks, GPUs) of one job of the stage: training may span GPUs, analysis and eval use one."""
        gpus = self.options.gpus_per_run
        if gpus is None:
            gpus = 1 if self.name == "slurm" else 0
        if stage not in ("train", "tune"):
            return 1, min(gpus, 1)
        return (gpus or self.options.tasks_per_run or 1), gpus

    def parameters(self, stage: str, count: int) -> dict[str, Any]:
        tasks, gpus = self._processes(stage)
        minutes = self.options.time_minutes()
        if self.name == "submitit-local":
            return {"timeout_min": minutes, "tasks_per_node": tasks, "gpus_per_node": gpus,
                    "signal_delay_s": self.options.signal_delay_s}
        params: dict[str, Any] = {
            "job_name": f"rankscope-{self.study_name}-{stage}", "time": max(1, round(minutes)), "nodes": 1,
            "ntasks_per_node": tasks, "signal_delay_s": self.options.signal_delay_s,
        }
        if gpus:
            params["gpus_per_node"] = gpus
        if self.options.partition:
            params["partition"] = self.options.partition
        if self.options.account:
            params["account"] = self.options.account
        if self.limit:
            params["array_parallelism"] = min(self.limit, max(count, 1))
        if self.options.extra:
            params["additional_parameters"] = dict(self.options.extra)
        return params

    def describe(self, stage: str, jobs: list[Job]) -> str:
        names = ", ".join(job.name for job in jobs)
        if self.name == "submitit-local":
            tasks, gpus = self._processes(stage)
            return (f"stage {stage}: {len(jobs)} submitit-local job(s), at most {self.limit} at a time, "
                    f"{tasks} task(s) and {gpus} GPU(s) each ({names})")
        shape = f"one job array of {len(jobs)} jobs" if len(jobs) > 1 else "one job"
        return (f"stage {stage}: {shape} ({names})\n"
                + sbatch_text(self.folder, self.parameters(stage, len(jobs)), len(jobs)))

    # -- submission ---------------------------------------------------------------------------

    def submit(self, stage: str, jobs: list[Job]) -> dict[str, Handle]:
        handles = {job.name: SubmititHandle(self.name) for job in jobs}
        if not jobs:
            return handles
        threads = self.options.threads or (1 if self.name == "submitit-local" else None)
        if self.name == "slurm":
            self.executor.update_parameters(**self.parameters(stage, len(jobs)))
            try:
                with self.executor.batch():  # one job array per stage
                    submitted = [self.executor.submit(SubmititJob(job, str(self.study_dir), threads)) for job in jobs]
            except Exception as exc:  # sbatch refused (bad partition, account, time...): say so in one line
                raise RankscopeError(f"sbatch refused the {stage} jobs: {error_line(exc)}; check the --slurm-* "
                                     "options (--dry-run prints what is submitted)") from None
            for job, sub in zip(jobs, submitted):
                handles[job.name].job = sub
            log.info("stage %s: submitted job array %s (%d jobs)", stage, str(submitted[0].job_id).split("_")[0], len(jobs))
        else:
            for job in jobs:
                self.queued.append((stage, SubmititJob(job, str(self.study_dir), threads), handles[job.name]))
            self._start_queued()
        return handles

    def _start_queued(self) -> None:
        """submitit-local starts every submitted job at once; keep at most `limit` running."""
        self.running = [h for h in self.running if not h.finished()]
        while self.queued and len(self.running) < self.limit:
            stage, callable_, handle = self.queued.popleft()
            self.executor.update_parameters(**self.parameters(stage, 1))
            handle.job = self.executor.submit(callable_)
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

    def interrupt(self) -> str:
        self.queued.clear()
        return (f"the {self.name} jobs already started keep running; run the same command again to follow "
                "them and submit the rest")


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
