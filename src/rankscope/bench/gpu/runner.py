"""The check's parent process: plan the paths, have a worker process run them one at a time under
a watchdog, and write gpu_check.json after every path.

Why a child process and not a thread: a hung CUDA kernel, an NCCL call that never returns or a
deadlocked compile cannot be interrupted from another thread of the same process, and a CUDA
error poisons every later kernel of that process. Killing the worker's process group always
works. One worker runs path after path (torch's import and the CUDA context are paid once, not
per path); a path that outlives its limit is killed with the worker, marked out_of_time, and the
next path gets a fresh worker. So does the path after one that left the device unusable, or
after a worker that died (a segfault, the OOM killer): that path is marked failed with the
worker's exit status and the end of its log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from rankscope.bench.common import write_json
from rankscope.bench.gpu.config import SCHEMA_NAME, STATUSES, GpuCheckConfig
from rankscope.bench.gpu.paths import PathResult
from rankscope.bench.gpu.plan import PlannedPath, plan
from rankscope.bench.gpu.summary import print_summary, summary_line
from rankscope.errors import ConfigError

log = logging.getLogger("rankscope.bench")

LOG_NAME = "gpu_check.log"
WORKER_MODULE = "rankscope.bench.gpu.worker"  # run as `python -m WORKER_MODULE SPEC RESULT_FD`, but:
# the worker asks Linux to kill it when the check dies (PR_SET_PDEATHSIG) before it imports
# anything: importing torch takes seconds, and a worker must not outlive a killed check.
LAUNCHER = ("import ctypes, runpy, signal, sys\n"
            "if sys.platform.startswith('linux'):\n"
            "    ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")
DEVICE_KEYS = {"name": "device_name", "count": "device_count", "capability": "capability",
               "total_memory_bytes": "total_memory_bytes", "peak_bf16_tflops": "peak_bf16_tflops"}


class WorkerGone(Exception):
    """The worker exited (or closed its answers) before answering."""


class Worker:
    """One `rankscope.bench.gpu.worker` process, in its own process group, with its stdout and
    stderr appended to the check's log."""

    def __init__(self, config: GpuCheckConfig, work: Path, log_path: Path, visible_gpus: int):
        spec = work / f"worker-{time.monotonic_ns()}.json"
        spec.write_text(json.dumps({"settings": dataclasses.asdict(config), "work": str(work),
                                    "parent_pid": os.getpid(), "visible_gpus": visible_gpus,
                                    "threads": torch.get_num_threads()}))
        read_end, write_end = os.pipe()
        env = dict(os.environ)
        source = str(Path(__file__).resolve().parents[3])  # this checkout's code, also when not installed
        env["PYTHONPATH"] = source + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"  # the log is current when the worker is killed
        self.log_path = log_path
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, WORKER_MODULE, str(spec), str(write_end)],
                stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT, pass_fds=(write_end,),
                start_new_session=True, env=env, text=True)
        os.close(write_end)
        self.answers = read_end
        self.buffer = b""

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerGone() from None

    def receive(self, timeout_s: float) -> dict[str, Any] | None:
        """The next answer, or None when none came within `timeout_s`; WorkerGone if it died."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.answers], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.answers, 1 << 16)
                if not chunk:
                    raise WorkerGone()
                self.buffer += chunk
            elif self.process.poll() is not None:
                raise WorkerGone()
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def exit_status(self) -> str:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "still running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    def stop(self) -> None:
        """Kill the worker and everything it started (its process group)."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        for stream in (self.process.stdin,):
            try:
                stream.close()
            except OSError:
                pass
        os.close(self.answers)


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def _device_block(results: list[PathResult]) -> dict[str, Any] | None:
    """The device as the environment path saw it (None until it has run)."""
    for result in results:
        if result.kind == "environment" and result.status == "ok":
            return {key: result.metrics.get(source) for key, source in DEVICE_KEYS.items()}
    return None


def payload(config: GpuCheckConfig, results: list[PathResult], pending: list[str], wall_s: float,
            log_path: Path | None) -> dict[str, Any]:
    counts = {status: sum(r.status == status for r in results) for status in STATUSES}
    complete = not pending
    return {
        "schema": SCHEMA_NAME,
        "ok": complete and counts["failed"] == 0 and counts["out_of_time"] == 0,
        "complete": complete,
        "counts": counts,
        "device": _device_block(results),
        "settings": dataclasses.asdict(config),
        "wall_s": wall_s,
        "log": str(log_path) if log_path is not None else None,
        "paths": [dataclasses.asdict(r) for r in results],
        "pending": pending,
    }


class Check:
    """The loop over the planned paths, with at most one live worker."""

    def __init__(self, config: GpuCheckConfig, work: Path, log_path: Path, visible_gpus: int, deadline: float):
        self.config, self.work, self.log_path, self.visible_gpus = config, work, log_path, visible_gpus
        self.deadline = deadline
        self.worker: Worker | None = None
        self.broken: str | None = None  # why no worker can start: every later path fails with it

    def _start_worker(self) -> str | None:
        """Start a worker and wait until it is ready; the reason when it could not be."""
        worker = Worker(self.config, self.work, self.log_path, self.visible_gpus)
        wait_s = min(self.config.worker_start_s, max(self.deadline - time.monotonic(), 0.0))
        try:
            answer = worker.receive(wait_s)
        except WorkerGone:
            answer = None
        if answer is not None and answer.get("event") == "ready":
            self.worker = worker
            return None
        worker.stop()
        return (f"the worker process did not start within {wait_s:.0f}s ({worker.exit_status()}; "
                f"last log lines: {_log_tail(self.log_path)})")

    def _drop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def run(self, planned: PlannedPath) -> PathResult:
        def result(status: str, seconds: float, error: str | None) -> PathResult:
            return PathResult(planned.path, planned.kind, status, seconds, error, {})

        if planned.run is None:
            return result("skipped", 0.0, planned.skip)
        if self.broken:
            return result("failed", 0.0, self.broken)
        left = self.deadline - time.monotonic()
        if left <= 0:
            return result("out_of_time", 0.0, f"not started: the {self.config.budget_s:g}s budget is spent")
        if self.worker is None:
            problem = self._start_worker()
            if problem is not None:
                if time.monotonic() >= self.deadline:
                    return result("out_of_time", 0.0,
                                  f"not started: the {self.config.budget_s:g}s budget ran out while its worker started")
                self.broken = problem
                return result("failed", 0.0, problem)
            left = self.deadline - time.monotonic()
        limit = min(planned.limit_s, left)
        started = time.monotonic()
        try:
            self.worker.send({"path": planned.path, "limit_s": limit})
            answer = self.worker.receive(limit)
        except WorkerGone:
            status = self.worker.exit_status()
            self._drop_worker()
            return result("failed", time.monotonic() - started,
                          f"the worker process died during this path ({status}); last log lines: "
                          f"{_log_tail(self.log_path)}")
        if answer is None:  # the watchdog: kill the worker, the next path gets a fresh one
            self._drop_worker()
            why = (f"its limit of {planned.limit_s:g}s" if planned.limit_s <= left
                   else f"the end of the {self.config.budget_s:g}s budget")
            return result("out_of_time", time.monotonic() - started, f"killed after {limit:.1f}s, at {why}")
        if not answer.get("healthy", True):
            self._drop_worker()  # the device is unusable in that process
        return PathResult(**answer["result"])

    def close(self) -> None:
        self._drop_worker()


def run_gpu_check(config: GpuCheckConfig, out_dir: str | Path | None = None, show: bool = True) -> dict[str, Any]:
    """Run every path (see the package doc); returns the JSON payload, which is also written to
    out_dir/gpu_check.json after every path (atomically: a reader never sees half a file)."""
    config.validate()
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench gpu: CUDA is not available here")
    visible_gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    planned = plan(config, device.type, visible_gpus)
    started = time.perf_counter()
    deadline = time.monotonic() + config.budget_s
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    results: list[PathResult] = []
    with tempfile.TemporaryDirectory(prefix="rankscope-gpu-check-") as work:
        log_path = (out if out is not None else Path(work)) / LOG_NAME
        log_path.write_bytes(b"")

        def write(pending: list[str]) -> dict[str, Any]:
            data = payload(config, results, pending, time.perf_counter() - started, log_path if out else None)
            if out is not None:
                write_json(out / "gpu_check.json", data)
            return data

        write([p.path for p in planned])
        check = Check(config, Path(work), log_path, visible_gpus, deadline)
        try:
            for index, path in enumerate(planned):
                results.append(check.run(path))
                data = write([p.path for p in planned[index + 1:]])
                if show:  # the figures as they come: a check killed from outside never prints its table
                    last = dataclasses.asdict(results[-1])
                    print(f"bench gpu: [{index + 1}/{len(planned)}] {last['path']} {last['status']} "
                          f"{last['seconds']:.1f}s: {summary_line(last)}", flush=True)
        finally:
            check.close()
    if out is not None:
        data["file"] = str(out / "gpu_check.json")
    if show:
        print_summary(data)
    return data
