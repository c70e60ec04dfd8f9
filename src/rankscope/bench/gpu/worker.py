"""The GPU check's worker: a child process that runs the paths its parent asks for, one at a time.

`python -m rankscope.bench.gpu.worker SPEC RESULT_FD`: SPEC is a JSON file with the settings, the
work folder, the parent's pid and the number of visible GPUs. Requests come one JSON line at a
time on stdin ({"path", "limit_s"}); each answer is one JSON line on RESULT_FD: first
{"event": "ready"}, then per request {"event": "result", "result": <PathResult>, "healthy": bool}.
Logs and tracebacks go to stdout/stderr (the parent sends them to gpu_check.log), so nothing a
path prints can garble an answer.

A failed path is recorded and the worker takes the next request, unless the device no longer
works (a CUDA error such as an illegal memory access poisons the whole context): then it answers
"healthy": false and exits, and the parent starts a fresh worker for the next path. The worker
dies with its parent (Linux), so a killed check leaves no process holding the GPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from rankscope.bench.gpu.config import GpuCheckConfig
from rankscope.bench.gpu.paths import Context, PathResult, device_peak_tflops, free_device
from rankscope.bench.gpu.plan import PlannedPath, plan
from rankscope.bench.gpu.processes import die_with_parent

log = logging.getLogger("rankscope.bench")


def run_path(planned: PlannedPath, ctx: Context) -> PathResult:
    """Run one path; any exception is its failure (type and message), never the worker's."""
    log.info("bench gpu: %s ...", planned.path)
    started = time.perf_counter()
    try:
        metrics, status, error = planned.run(ctx), "ok", None
    except Exception as exc:
        metrics, status = {}, "failed"
        error = f"{type(exc).__name__}: {exc}".strip()
        log.error("bench gpu: %s failed\n%s", planned.path, traceback.format_exc())
    finally:
        if planned.kind == "compile":
            import torch._dynamo

            torch._dynamo.reset()  # the compiled graphs hold on to that path's model
        try:
            free_device(ctx.device)
        except Exception:  # a poisoned CUDA context; device_usable() says so next
            pass
    seconds = time.perf_counter() - started
    log.info("bench gpu: %s %s in %.1fs", planned.path, status, seconds)
    return PathResult(planned.path, planned.kind, status, seconds, error, metrics)


def device_usable(device: torch.device) -> bool:
    """Whether the device still runs a kernel (after a failure, a CUDA error may have poisoned it)."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return torch.ones(1, device=device).add_(1).item() == 2.0
    except Exception:
        return False


def serve(config: GpuCheckConfig, work: Path, visible_gpus: int, requests: Iterable[str],
          emit: Callable[[dict[str, Any]], None]) -> None:
    """Answer each request (a path of the plan) with its result, until the requests end."""
    device = torch.device(config.device)
    planned = {p.path: p for p in plan(config, device.type, visible_gpus)}
    peak_tflops = device_peak_tflops(config, device)
    emit({"event": "ready", "pid": os.getpid()})
    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        result = run_path(planned[request["path"]], Context(config, device, work, peak_tflops, request["limit_s"]))
        healthy = result.status == "ok" or device_usable(device)
        emit({"event": "result", "result": dataclasses.asdict(result), "healthy": healthy})
        if not healthy:
            return


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    die_with_parent(signal.SIGKILL)
    if os.getppid() != spec["parent_pid"]:
        return 1  # the parent died before the line above took effect
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(process)d %(levelname)s %(message)s")
    config = GpuCheckConfig.from_settings(spec["settings"])
    torch.set_num_threads(spec["threads"])  # the parent's (--threads)
    with os.fdopen(int(argv[1]), "w", buffering=1) as answers:

        def emit(message: dict[str, Any]) -> None:
            answers.write(json.dumps(message, default=str) + "\n")
            answers.flush()

        serve(config, Path(spec["work"]), spec["visible_gpus"], sys.stdin, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
