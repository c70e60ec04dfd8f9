"""Which paths the GPU check runs, in which order, with which watchdog limits.

The parent process uses the plan for names, kinds, limits and skips; the worker process builds
the same plan from the same settings and looks up each requested path's function in it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rankscope.bench.gpu import cost_paths, memory_paths, paths, trainer_paths
from rankscope.bench.gpu.config import GpuCheckConfig
from rankscope.bench.gpu.paths import Context


@dataclass
class PlannedPath:
    path: str
    kind: str
    run: Callable[[Context], dict[str, Any]] | None  # None: skipped (the reason in `skip`)
    limit_s: float  # the watchdog kills the path after this long
    skip: str | None = None


def plan(config: GpuCheckConfig, device_type: str, visible_gpus: int) -> list[PlannedPath]:
    """Every path, most important first: a check cut short by its budget loses the least."""
    planned: list[PlannedPath] = []

    def add(path: str, kind: str, run: Callable[[Context], dict[str, Any]] | None, skip: str | None = None) -> None:
        planned.append(PlannedPath(path, kind, run, config.limit_s(kind), skip))

    add("environment", "environment", paths.environment_path)
    # Compilation first: it is the slowest and the likeliest to break (inductor's lowering of
    # SLTrain's bf16 index_add_, recompiles), and the rest does not depend on it.
    for method in config.compile_methods:
        add(f"compile/{method}/bf16-autocast", "compile", lambda ctx, m=method: paths.compile_path(ctx, m))
    for method in config.method_names():
        for precision in config.precisions:
            add(f"train/{method}/{precision}", "train",
                lambda ctx, m=method, p=precision: paths.train_path(ctx, m, p))
    add("optimizer-state/bf16-pure", "optimizer_state", paths.optimizer_state_path)
    for method in config.dynamics_methods:
        add(f"dynamics/{config.preset}/{method}", "dynamics", lambda ctx, m=method: memory_paths.dynamics_path(ctx, m))
    add(f"trainer/{config.rng_method}/rng-resume", "trainer", trainer_paths.rng_resume_path)
    add("trainer/relora/warm-start", "trainer", trainer_paths.warm_start_path)
    add(f"trainer/{config.trainer_method}/bf16-pure/checkpoint-resume", "trainer", trainer_paths.trainer_path)
    for method in config.memory_methods:
        add(f"memory/{config.memory_preset}/{method}/seq{config.memory_seq_len}", "memory",
            lambda ctx, m=method: memory_paths.memory_path(ctx, m))
    rows, cols = config.projector_shape
    add(f"projector/{rows}x{cols}", "projector", cost_paths.projector_path)
    for preset in config.throughput_presets:
        for method in config.throughput_methods:
            add(f"throughput/{preset}/{method}", "throughput",
                lambda ctx, p=preset, m=method: paths.throughput_path(ctx, p, m))
    backend = "nccl" if device_type == "cuda" else "gloo"
    add(f"process-group/{backend}/world-1", "process_group", paths.process_group_path)
    processes = config.ddp_processes if config.ddp_processes is not None else visible_gpus
    unit = "gpus" if device_type == "cuda" else "processes"
    if processes < 2:
        add(f"ddp/{config.ddp_method}/{processes}-{unit}", "ddp", None,
            f"{processes} GPU(s) to use ({visible_gpus} visible): DistributedDataParallel needs two or more")
    else:
        add(f"ddp/{config.ddp_method}/{processes}-{unit}", "ddp", lambda ctx: trainer_paths.ddp_path(ctx, processes))
    dense, factorized = config.infer_methods
    add(f"infer/{config.infer_preset}/{dense}-vs-{factorized}", "infer", cost_paths.infer_path)
    for method in config.landscape_methods:
        add(f"landscape/{config.preset}/{method}", "landscape", lambda ctx, m=method: cost_paths.landscape_path(ctx, m))
    return planned
