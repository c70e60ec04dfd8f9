"""The check: plan every path, run each inside the budget (a failure is recorded and the next
path runs), write gpu_check.json."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rankscope.bench.common import (
    environment,
    write_json,
)
from rankscope.bench.gpu.config import SCHEMA_NAME, STATUSES, GpuCheckConfig
from rankscope.bench.gpu.paths import (
    PathResult,
    ddp_path,
    free_device,
    infer_path,
    landscape_path,
    train_path,
    trainer_path,
)
from rankscope.bench.gpu.summary import print_summary
from rankscope.errors import ConfigError

log = logging.getLogger("rankscope.bench")

@dataclass
class PlannedPath:
    path: str
    kind: str
    run: Callable[[], dict[str, Any]] | None  # None: skipped (the reason in `skip`)
    reserve_s: float  # do not start with less time than this left
    skip: str | None = None


def plan(config: GpuCheckConfig, device: torch.device, peak_tflops: float | None, work: Path,
         deadline: float) -> list[PlannedPath]:
    planned = []
    for method in config.method_names():
        for precision in config.precisions:
            planned.append(PlannedPath(
                f"train/{method}/{precision}", "train",
                lambda m=method, p=precision: train_path(config, m, p, False, device, peak_tflops), 10.0))
    dense, factorized = config.infer_methods
    planned.append(PlannedPath(f"infer/{config.infer_preset}/{dense}-vs-{factorized}", "infer",
                               lambda: infer_path(config, device), 20.0))
    for method in config.landscape_methods:
        planned.append(PlannedPath(f"landscape/{config.preset}/{method}", "landscape",
                                   lambda m=method: landscape_path(config, m, device), 5.0))
    planned.append(PlannedPath(f"trainer/{config.trainer_method}/bf16-pure/checkpoint-resume", "trainer",
                               lambda: trainer_path(config, device, work), 25.0))
    visible = torch.cuda.device_count() if device.type == "cuda" else 0
    processes = config.ddp_processes if config.ddp_processes is not None else visible
    ddp = PlannedPath(f"ddp/{config.ddp_method}/{processes}-{'gpus' if device.type == 'cuda' else 'processes'}",
                      "ddp", lambda: ddp_path(config, device, processes, work, max(1.0, deadline - time.monotonic())),
                      40.0)
    if processes < 2:
        ddp.run, ddp.skip = None, f"{processes} GPU(s) to use ({visible} visible): DistributedDataParallel needs two or more"
    planned.append(ddp)
    for method in config.compile_methods:
        planned.append(PlannedPath(
            f"train/{method}/bf16-autocast/compiled", "train",
            lambda m=method: train_path(config, m, "bf16-autocast", True, device, peak_tflops), 60.0))
    return planned


def execute(planned: PlannedPath, deadline: float, device: torch.device) -> PathResult:
    if planned.run is None:
        return PathResult(planned.path, planned.kind, "skipped", 0.0, planned.skip, {})
    left = deadline - time.monotonic()
    if left < planned.reserve_s:
        return PathResult(planned.path, planned.kind, "out_of_time", 0.0,
                          f"not started: {max(left, 0.0):.0f}s of the budget left, the path needs ~{planned.reserve_s:.0f}s",
                          {})
    log.info("bench gpu: %s ...", planned.path)
    started = time.perf_counter()
    try:
        metrics = planned.run()
        status, error = "ok", None
    except Exception as exc:  # every failure is recorded; the next path still runs
        metrics, status = {}, "failed"
        error = f"{type(exc).__name__}: {exc}".strip()
        log.error("bench gpu: %s failed\n%s", planned.path, traceback.format_exc())
    finally:
        free_device(device)
    seconds = time.perf_counter() - started
    log.info("bench gpu: %s %s in %.1fs", planned.path, status, seconds)
    return PathResult(planned.path, planned.kind, status, seconds, error, metrics)


def device_info(device: torch.device, peak_tflops: float | None) -> dict[str, Any]:
    if device.type != "cuda":
        return {"name": "cpu", "count": 0, "capability": None, "total_memory_bytes": None,
                "peak_bf16_tflops": peak_tflops}
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "count": torch.cuda.device_count(), "capability": f"{props.major}.{props.minor}",
            "total_memory_bytes": props.total_memory, "peak_bf16_tflops": peak_tflops}


def run_gpu_check(config: GpuCheckConfig, out_dir: str | Path | None = None, show: bool = True) -> dict[str, Any]:
    """Run every path (see the module doc); returns the JSON payload (also written to out_dir)."""
    from rankscope.bench.flops import lookup_peak_tflops

    config.validate()
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench gpu: CUDA is not available here")
    started = time.perf_counter()
    deadline = time.monotonic() + config.budget_s
    peak_tflops = config.peak_tflops
    if peak_tflops is None and device.type == "cuda":
        peak_tflops = lookup_peak_tflops(torch.cuda.get_device_name(device))
    results: list[PathResult] = []
    with tempfile.TemporaryDirectory(prefix="rankscope-gpu-check-") as work:
        for planned in plan(config, device, peak_tflops, Path(work), deadline):
            results.append(execute(planned, deadline, device))
    counts = {status: sum(r.status == status for r in results) for status in STATUSES}
    payload = {
        "schema": SCHEMA_NAME,
        "ok": counts["failed"] == 0 and counts["out_of_time"] == 0,
        "counts": counts,
        "device": device_info(device, peak_tflops),
        "environment": environment(device),
        "settings": dataclasses.asdict(config),
        "wall_s": time.perf_counter() - started,
        "paths": [dataclasses.asdict(r) for r in results],
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "gpu_check.json", payload)
        payload["file"] = str(out / "gpu_check.json")
    if show:
        print_summary(payload)
    return payload

