"""The local launcher: N worker processes on this machine, each running one job at a time.

Workers are started with `spawn` (a clean interpreter: no CUDA state or threads inherited from
the driver) and live for the whole study, so torch and the eval harness are imported once per
worker, not once per job. Each worker sets its torch thread count (1 on CPU by default, so a run
computes the same numbers whatever the number of workers) and, on a GPU machine, sees one GPU.

The driver hands a job to an idle worker through that worker's inbox and hears back on one
shared queue. A worker that dies in a job (killed, out of memory) has that job recorded as
failed and is replaced. Ctrl-C reaches the driver only: workers ignore SIGINT, and the driver
asks each busy one (SIGTERM) to stop; a training run then checkpoints its current step.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import time
from collections import deque
from pathlib import Path
from typing import Any

from rankscope.study.jobs import LOG_FORMAT, Job, execute_job
from rankscope.study.launch import Handle, Launcher, LaunchOptions, Submitted, cpu_count, without_distributed_env

log = logging.getLogger("rankscope.study")

STOP_GRACE_S = 120  # how long a stopping run may take to checkpoint before its worker is killed


class LocalHandle(Handle):
    def __init__(self) -> None:
        self.state = "queued"  # queued | running | finished
        self.error: str | None = None

    def finished(self) -> bool:
        return self.state == "finished"

    def failure(self) -> str | None:
        return self.error


class _Worker:
    def __init__(self, context, slot: int, events, study_dir: Path, threads: int, gpu: str | None):
        self.slot = slot
        self.inbox = context.Queue()
        self.process = context.Process(
            target=_worker_main, args=(slot, self.inbox, events, str(study_dir), threads, gpu, os.getpid()),
            name=f"rankscope-worker-{slot}", daemon=True,
        )
        self.process.start()
        self.job: Job | None = None


class LocalLauncher(Launcher):
    name = "local"

    def __init__(self, study_dir: Path, options: LaunchOptions):
        self.study_dir = Path(study_dir)
        self.gpus = visible_gpus()
        self.size = options.workers or (len(self.gpus) or cpu_count())
        if options.threads:
            self.threads = options.threads
        else:  # one thread per CPU run (same numbers whatever the pool size); GPU runs share the cores
            self.threads = max(1, cpu_count() // self.size) if self.gpus else 1
        self.context = multiprocessing.get_context("spawn")
        self.events = self.context.Queue()
        self.workers: dict[int, _Worker] = {}
        self.pending: deque[tuple[Job, LocalHandle]] = deque()
        self.handles: dict[tuple[str, str], LocalHandle] = {}

    def describe(self, stage: str, jobs: list[Job]) -> str:
        device = f", one GPU each ({len(self.gpus)} visible)" if self.gpus else f", {self.threads} torch thread(s) each"
        return f"stage {stage}: {len(jobs)} job(s) on {min(self.size, len(jobs))} local worker process(es){device}"

    def submit(self, stage: str, jobs: list[Job], on_submitted: Submitted | None = None) -> dict[str, Handle]:
        # Nothing to record: the workers end with the driver, and a new driver runs the jobs again.
        handles = {}
        for job in jobs:
            handle = LocalHandle()
            self.pending.append((job, handle))
            self.handles[(job.stage, job.name)] = handle
            handles[job.name] = handle
        self._dispatch()
        return handles

    def _dispatch(self) -> None:
        while self.pending:
            worker = next((w for w in self.workers.values() if w.job is None and w.process.is_alive()), None)
            if worker is None:
                if len(self.workers) >= self.size:
                    return
                slot = next(i for i in range(self.size) if i not in self.workers)
                gpu = self.gpus[slot % len(self.gpus)] if self.gpus else None
                worker = self.workers[slot] = _Worker(self.context, slot, self.events, self.study_dir, self.threads, gpu)
            job, handle = self.pending.popleft()
            worker.job = job
            handle.state = "running"
            worker.inbox.put(job)

    def poll(self) -> None:
        # Look for dead workers before reading the queue: a job that finished just before its
        # worker died has its news in the queue and is not a failure.
        dead = [w for w in self.workers.values() if not w.process.is_alive()]
        while True:
            try:
                _, slot, stage, name = self.events.get_nowait()
            except queue.Empty:
                break
            self.handles[(stage, name)].state = "finished"
            self.workers[slot].job = None
        for worker in dead:
            if worker.job is not None:  # died inside a job: the job failed, the study goes on
                handle = self.handles[(worker.job.stage, worker.job.name)]
                handle.error = f"the worker process running it died ({_exit_reason(worker.process.exitcode)})"
                handle.state = "finished"
            del self.workers[worker.slot]
        self._dispatch()

    def interrupt(self) -> str:
        self.pending.clear()
        busy = [w for w in self.workers.values() if w.job is not None and w.process.is_alive()]
        for worker in self.workers.values():
            worker.inbox.put(None)  # exit after the current job
        for worker in busy:
            os.kill(worker.process.pid, signal.SIGTERM)  # and end that job early
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in busy:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        self.close()
        return "stopped the running jobs (training runs saved a checkpoint of their current step)"

    def close(self) -> None:
        for worker in self.workers.values():
            if worker.process.is_alive():
                worker.inbox.put(None)
        for worker in self.workers.values():
            worker.process.join(10)
            if worker.process.is_alive():
                worker.process.kill()
        self.workers.clear()


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries for the workers."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed or [str(i) for i in range(torch.cuda.device_count())]


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


# ---------------------------------------------------------------------------------------------
# inside a worker process


_current: dict[str, Any] = {"job": None}


def _on_stop_request(signum: int, frame: Any) -> None:
    from rankscope.train.preemption import request_stop

    job = _current["job"]
    if job is not None and job.stops_gracefully:
        request_stop()  # the run checkpoints after its current step and returns
    else:
        raise KeyboardInterrupt  # nothing to save: stop now, the unfinished part is redone next time


def _worker_main(slot: int, inbox, events, study_dir: str, threads: int, gpu: str | None, driver_pid: int) -> None:
    # A worker is one single-GPU (or CPU) run, never a rank of the driver's process group: with
    # torchrun's RANK/WORLD_SIZE/LOCAL_RANK inherited, the trainer would wait for ranks that do not
    # exist, or pick cuda:LOCAL_RANK when it sees a single GPU.
    without_distributed_env(os.environ)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before the first CUDA call of this process
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    signal.signal(signal.SIGTERM, _on_stop_request)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt="%H:%M:%S")
    import torch

    torch.set_num_threads(threads)
    try:
        while True:
            try:
                job = inbox.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != driver_pid:  # the driver is gone: nobody will read our results
                    return
                continue
            if job is None:
                return
            _current["job"] = job
            try:
                execute_job(job, study_dir, capture_output=True)
            finally:
                _current["job"] = None
            events.put(("finished", slot, job.stage, job.name))
    except KeyboardInterrupt:  # asked to stop between jobs, or inside one that cannot stop cleanly
        return
