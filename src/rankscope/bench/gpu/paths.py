"""The measuring paths of the GPU check, each a function of a `Context` returning its metrics (or
raising), and the helpers they share: environment, compile, train, optimizer state, throughput
and the process group. Memory paths are in memory_paths.py, projector/inference/landscape costs in
cost_paths.py, the paths that go through `rankscope.train` in trainer_paths.py."""

from __future__ import annotations

import gc
import importlib.metadata
import importlib.util
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from rankscope.bench.common import (
    environment,
    median,
    synchronize,
)
from rankscope.bench.gpu.config import GpuCheckConfig
from rankscope.errors import RankscopeError

log = logging.getLogger("rankscope.bench")


@dataclass
class PathResult:
    path: str
    kind: str
    status: str
    seconds: float
    error: str | None
    metrics: dict[str, Any]


@dataclass
class Context:
    """What every path gets: the settings, the device, a work folder shared by the paths of one
    check (the synthetic corpus and its token cache live there), and the device's bf16 peak."""

    config: GpuCheckConfig
    device: torch.device
    work: Path
    peak_tflops: float | None
    limit_s: float  # the watchdog's limit for the running path (a path with a child process uses it)


# ---------------------------------------------------------------------------------------------
# helpers


def free_device(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def start_peak(device: torch.device) -> int:
    free_device(device)
    if device.type != "cuda":
        return 0
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_since(device: torch.device, baseline: int) -> int | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline


def require_finite(values: list[float], what: str) -> None:
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise RankscopeError(f"{what} is not finite at step {bad[0]} (of {len(values)})")


def require_finite_weights(model: torch.nn.Module, what: str) -> None:
    with torch.no_grad():
        bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise RankscopeError(f"{what}: non-finite weights, e.g. {bad[0]}")


def state_dtypes(optimizer: torch.optim.Optimizer) -> list[str]:
    """The dtypes of the optimizer's floating-point state tensors (moments, projectors; scalar step
    counters left out), e.g. ["float32"]."""
    found = {str(t.dtype).removeprefix("torch.") for state in optimizer.state.values() for t in state.values()
             if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0}
    return sorted(found)


def device_peak_tflops(config: GpuCheckConfig, device: torch.device) -> float | None:
    from rankscope.bench.flops import lookup_peak_tflops

    if config.peak_tflops is not None or device.type != "cuda":
        return config.peak_tflops
    return lookup_peak_tflops(torch.cuda.get_device_name(device))


def run_config(preset: str, method: str, batch_size: int, seq_len: int, model_overrides: dict[str, Any],
               method_overrides: dict[str, Any] | None = None, **sections: dict[str, Any]):
    """A RunConfig as `bench.train.build_config` makes it, plus `optim`/`train` keys (e.g. optim=
    {"state_dtype": "fp32"})."""
    from rankscope.bench.train import build_config
    from rankscope.config import build_config as build_run_config
    from rankscope.config import config_to_dict

    tree = config_to_dict(build_config(preset, method, batch_size, seq_len, model_overrides, method_overrides))
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return build_run_config(tree)


def method_run(cfg, device: torch.device, precision: str, seed: int, on_device: bool = False):
    """A `bench.train.MethodRun` (model, optimizer, step counter) built as the trainer builds it,
    from a RunConfig; `on_device` creates the weights on the device (a 1B model in seconds)."""
    from rankscope.bench.train import MethodRun, build_for_training
    from rankscope.models import get_preset
    from rankscope.train.setup import resolve_model_config

    vocab = int(cfg.model.overrides.get("vocab_size", get_preset(cfg.model.preset).vocab_size))
    model_config = resolve_model_config(cfg, vocab)
    model, method, optimizer, optim = build_for_training(cfg, model_config, seed, precision, device, on_device)
    model.train()
    return MethodRun(cfg.method.name, cfg, model_config, model, model, method, optimizer, optim, precision, device)


def _package_version(name: str) -> str | None:
    # Read from the installed metadata: importing triton only to print its version costs seconds.
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nccl_version() -> str | None:
    if not torch.distributed.is_available() or not torch.distributed.is_nccl_available():
        return None
    try:
        version = torch.cuda.nccl.version()
    except Exception:  # a build without NCCL bindings
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


# ---------------------------------------------------------------------------------------------
# environment


def environment_path(ctx: Context) -> dict[str, Any]:
    """Versions the numbers depend on, the device and its bf16 peak (for MFU). Touching the device
    here makes a broken CUDA setup fail this path, not the first training path."""
    device = ctx.device
    if device.type == "cuda":
        torch.ones(1, device=device).add_(1).item()
    info = environment(device)
    props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    return {
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": _nccl_version(), "triton": _package_version("triton"),
        "python": info["python"], "platform": info["platform"], "cpu_count": info["cpu_count"],
        "torch_threads": info["torch_threads"], "load_average_1min": info["load_average_1min"],
        # What fp32 matmuls run as in this process (the trainer may set "high" for TF32 on CUDA).
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "device_name": props.name if props else "cpu",
        "device_count": torch.cuda.device_count() if device.type == "cuda" else 0,
        "capability": f"{props.major}.{props.minor}" if props else None,
        "total_memory_bytes": props.total_memory if props else None,
        "peak_bf16_tflops": ctx.peak_tflops,
    }


# ---------------------------------------------------------------------------------------------
# training steps: compile, train, throughput


def _train_steps(run, batches: list[torch.Tensor], steps: int) -> tuple[list[float], list[dict[str, float]]]:
    from rankscope.bench.train import train_step

    losses, samples = [], []
    for index in range(steps):
        sample = train_step(run, batches[index % len(batches)])
        losses.append(sample.pop("loss"))
        samples.append(sample)
    return [float(loss) for loss in losses], samples


def compile_path(ctx: Context, method: str) -> dict[str, Any]:
    """The same steps eager, then under torch.compile from the same weights on the same batches:
    compile time, graphs compiled (one expected), graph breaks, and the compiled losses next to the
    eager ones (bf16-autocast), at the preset's width and `compile_layers` blocks."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from rankscope.bench.train import build_method_run, random_batches

    config, device, precision = ctx.config, ctx.device, "bf16-autocast"
    overrides = dict(config.model_overrides)
    if config.compile_layers is not None:
        overrides["num_layers"] = config.compile_layers

    def build():
        return build_method_run(config.preset, method, config.batch_size, config.seq_len, overrides, device,
                                precision, config.seed, period=None)

    run = build()
    batches = random_batches(run.model_config.vocab_size, config.batch_size, config.seq_len, config.compile_steps,
                             config.seed, device)
    eager_losses, _ = _train_steps(run, batches, config.compile_steps)
    del run
    free_device(device)
    torch._dynamo.reset()
    counters.clear()
    run = build()
    run.forward_model = torch.compile(run.model, backend=config.compile_backend)
    compiled_losses, samples = _train_steps(run, batches, config.compile_steps)
    require_finite(compiled_losses, f"compiled {method} training loss")
    require_finite_weights(run.model, f"compiled {method}")
    differences = [abs(c - e) / max(abs(e), 1e-8) for c, e in zip(compiled_losses, eager_losses)]
    worst = max(range(len(differences)), key=differences.__getitem__)
    if differences[worst] > config.compile_loss_rtol:
        raise RankscopeError(f"compiled {method} loss {compiled_losses[worst]:.5f} differs from eager "
                             f"{eager_losses[worst]:.5f} at step {worst} (relative {differences[worst]:.2e} > "
                             f"{config.compile_loss_rtol:g})")
    step_s = median(s["total"] for s in samples[1:]) if len(samples) > 1 else samples[0]["total"]
    return {
        "method": method, "precision": precision, "backend": config.compile_backend,
        "layers": run.model_config.num_layers, "steps": config.compile_steps,
        "compile_s": samples[0]["total"], "step_s": step_s,
        "tokens_per_s": config.batch_size * config.seq_len / step_s,
        # One graph when the model compiles once; two meant a recompile (#10 of the GPU audit).
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "eager_losses": eager_losses, "compiled_losses": compiled_losses, "max_loss_rel_diff": differences[worst],
    }


def train_path(ctx: Context, method: str, precision: str) -> dict[str, Any]:
    """A few trainer steps of one method with its periodic work every `period` steps: finite
    loss and weights, throughput, MFU, peak memory and the dtypes of the optimizer state."""
    from rankscope.bench.flops import mfu, model_flops
    from rankscope.bench.train import build_method_run, random_batches, summarize
    from rankscope.methods.memory_accounting import account_memory

    config, device = ctx.config, ctx.device
    baseline = start_peak(device)
    run = build_method_run(config.preset, method, config.batch_size, config.seq_len, config.model_overrides,
                           device, precision, config.seed, period=config.period)
    batches = random_batches(run.model_config.vocab_size, config.batch_size, config.seq_len, 4, config.seed, device)
    losses, samples = _train_steps(run, batches, config.steps)
    run.samples.extend(samples[config.warmup_steps:])
    peak = peak_since(device, baseline)
    require_finite(losses, f"{method} {precision} training loss")
    require_finite_weights(run.model, f"{method} {precision} after {config.steps} steps")

    tokens_per_step = config.batch_size * config.seq_len
    summary = summarize(run, tokens_per_step)
    memory = account_memory(run.model, run.optimizer)
    flops = model_flops(run.model, config.batch_size, config.seq_len).training_per_token
    return {
        "method": method, "precision": precision, "steps": config.steps,
        "tokens_per_step": tokens_per_step, "step_s": summary["step_s"], "tokens_per_s": summary["tokens_per_s"],
        "model_flops_per_token": flops,
        "mfu": mfu(flops, summary["tokens_per_s"], ctx.peak_tflops) if ctx.peak_tflops else None,
        "period_setting": summary["period_setting"], "period": summary["period_timed"],
        "periodic_extra_s": summary["periodic_extra_s"],
        # The memory table offers no training estimate (grads, activations) to set this against.
        "peak_cuda_bytes": peak,
        "weights_and_state_bytes": memory["param_bytes"] + memory["optimizer_state_bytes"],
        "state_dtypes": state_dtypes(run.optimizer),
        "loss_first": losses[0], "loss_last": losses[-1], "total_params": memory["total_params"],
    }


def throughput_path(ctx: Context, preset: str, method: str) -> dict[str, Any]:
    """Steady-state tokens/s and MFU of one method at one preset (its own periods: no periodic
    work is forced into the few steps timed)."""
    from rankscope.bench.flops import mfu, model_flops
    from rankscope.bench.train import build_method_run, random_batches

    config, device, precision = ctx.config, ctx.device, ctx.config.throughput_precision
    batch_size, seq_len = config.throughput_batch_size, config.seq_len
    baseline = start_peak(device)
    run = build_method_run(preset, method, batch_size, seq_len, config.model_overrides, device, precision,
                           config.seed, period=None)
    batches = random_batches(run.model_config.vocab_size, batch_size, seq_len, 2, config.seed, device)
    losses, samples = _train_steps(run, batches, config.throughput_steps)
    peak = peak_since(device, baseline)
    require_finite(losses, f"{method} {preset} training loss")
    step_s = median(s["total"] for s in samples[3:])
    flops = model_flops(run.model, batch_size, seq_len).training_per_token
    tokens_per_s = batch_size * seq_len / step_s
    return {
        "preset": preset, "method": method, "precision": precision, "batch_size": batch_size, "seq_len": seq_len,
        "steps": config.throughput_steps, "step_s": step_s, "tokens_per_s": tokens_per_s,
        "model_flops_per_token": flops, "mfu": mfu(flops, tokens_per_s, ctx.peak_tflops) if ctx.peak_tflops else None,
        "peak_cuda_bytes": peak, "total_params": sum(p.numel() for p in run.model.parameters()),
    }


# ---------------------------------------------------------------------------------------------
# optimizer state under bf16-pure


def bf16_second_moment_ratchet(steps: int, device: torch.device) -> dict[str, float]:
    """torch AdamW's exp_avg_sq on a bf16 and an fp32 parameter, after a tenth of the steps at
    gradient 1 and the rest at 0.01. In fp32 it decays by beta2 = 0.999 per step; in bf16 it
    cannot (v * 0.999 rounds back to v: the change is below bf16's half-ulp of 2^-9), so it stays
    where the large gradients left it, and later updates shrink by sqrt(v_bf16 / v_fp32)."""
    second_moment = {}
    for dtype in (torch.bfloat16, torch.float32):
        param = torch.zeros(256, device=device, dtype=dtype, requires_grad=True)
        optimizer = torch.optim.AdamW([param], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
        for step in range(steps):
            param.grad = torch.full_like(param, 1.0 if step < max(1, steps // 10) else 0.01)
            optimizer.step()
        second_moment[dtype] = float(optimizer.state[param]["exp_avg_sq"].float().mean())
    return {"bf16": second_moment[torch.bfloat16], "fp32": second_moment[torch.float32]}


def optimizer_state_path(ctx: Context) -> dict[str, Any]:
    """Under bf16-pure with optim.state_dtype=fp32 every floating optimizer state tensor of each of
    `state_methods` must be fp32 after two steps; then the bf16 second-moment ratchet that this
    setting avoids, on the device's own kernels (recorded, not asserted)."""
    from rankscope.bench.train import random_batches

    config, device = ctx.config, ctx.device
    found = {}
    for method in config.state_methods:
        cfg = run_config(config.preset, method, config.batch_size, config.seq_len, config.model_overrides,
                         optim={"state_dtype": "fp32"})
        run = method_run(cfg, device, "bf16-pure", config.seed)
        batches = random_batches(run.model_config.vocab_size, config.batch_size, config.seq_len, 2, config.seed, device)
        losses, _ = _train_steps(run, batches, 2)
        require_finite(losses, f"{method} bf16-pure training loss")
        found[method] = state_dtypes(run.optimizer)
        del run
        free_device(device)
    wrong = {method: dtypes for method, dtypes in found.items() if dtypes != ["float32"]}
    if wrong:
        method, dtypes = next(iter(wrong.items()))
        raise RankscopeError(f"optim.state_dtype=fp32 under bf16-pure, but {method}'s optimizer state holds "
                             f"{', '.join(dtypes)} tensors ({len(wrong)} of {len(found)} methods)")
    ratchet = bf16_second_moment_ratchet(config.ratchet_steps, device)
    return {"precision": "bf16-pure", "state_dtype": "fp32", "state_dtypes": found,
            "ratchet_steps": config.ratchet_steps, "ratchet_bf16_exp_avg_sq": ratchet["bf16"],
            "ratchet_fp32_exp_avg_sq": ratchet["fp32"], "ratchet_ratio": ratchet["bf16"] / ratchet["fp32"]}


# ---------------------------------------------------------------------------------------------
# the dynamics measurement's memory


def process_group_path(ctx: Context) -> dict[str, Any]:
    """A process group of world size 1 (NCCL on CUDA, gloo on the CPU) through a file store (no
    network): init, an all_reduce whose sum must equal its input, a barrier, destroy."""
    import torch.distributed as dist

    device = ctx.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = dist.FileStore(str(ctx.work / f"process-group-{os.getpid()}-{time.monotonic_ns()}"), 1)
    seconds = {}
    started = time.perf_counter()
    try:
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timedelta(seconds=ctx.limit_s),
                                device_id=device if device.type == "cuda" else None)
        seconds["init"] = time.perf_counter() - started
        values = torch.arange(8, dtype=torch.float32, device=device)
        reduced = values.clone()
        started = time.perf_counter()
        dist.all_reduce(reduced)
        synchronize(device)
        seconds["all_reduce"] = time.perf_counter() - started
        if not torch.equal(reduced, values):
            raise RankscopeError(f"all_reduce over one process changed the values: {reduced.tolist()}")
        started = time.perf_counter()
        dist.barrier()
        seconds["barrier"] = time.perf_counter() - started
        started = time.perf_counter()
        dist.destroy_process_group()
        seconds["destroy"] = time.perf_counter() - started
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return {"backend": backend, "world_size": 1, "nccl": _nccl_version() if backend == "nccl" else None,
            "init_s": seconds["init"], "all_reduce_s": seconds["all_reduce"], "barrier_s": seconds["barrier"],
            "destroy_s": seconds["destroy"]}
