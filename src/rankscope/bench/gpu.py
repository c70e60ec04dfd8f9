"""`rankscope bench gpu` (also `scripts/gpu_check.sh`): one unattended check of every GPU-only path.

What it runs, in this order, each path on its own (a failure is recorded and the next path runs):

1. train/<method>/<precision>: every method at the 60M preset, bf16-pure and bf16-autocast,
   `steps` steps of the trainer's phases (`bench.train.train_step`: forward + backward,
   clipping, optimizer step, the method's after_step) on random tokens, with each method's
   periodic work (GaLore/Fira refresh, LORO exact step, ReLoRA merge) every `period` steps.
   Measures tokens/s and MFU on the steady steps, and the peak CUDA allocation next to the memory
   table's formula for the same model and optimizer (`account_memory`: bf16 weights + optimizer
   states, what `rankscope methods --memory` prints). Fails on a non-finite loss or weight.
2. infer/<preset>/<dense>-vs-<factorized>: forward latency of the dense model and a factorized
   one (LORO's B·A) at 1B shapes in bf16 on LORO Table 3's grid (batch 64, sequences up to 1024):
   the speedup LORO reports as 2x-4x.
3. landscape/<preset>/<method>: one landscape point (write θ + α·d, evaluate the probe loss)
   against one plain forward over the same probe set (`analysis.pipeline.measure_point_cost`).
4. trainer/<method>/bf16-pure/checkpoint-resume: the real `rankscope.train.train` on the GPU
   (embedded corpus) with a checkpoint half-way and at the end; then, as after a preemption, the
   later checkpoint is removed and the same command resumes from the half-way one to the end.
   Both must finish with a finite validation loss (both are reported; GPU kernels are not
   bit-reproducible, so they are not required to be equal).
5. ddp/<method>/<n>-gpus: `torchrun --nproc_per_node <all visible GPUs> -m rankscope train ...`,
   the DistributedDataParallel path; skipped (not failed) with fewer than two GPUs.
6. train/<method>/bf16-autocast/compiled: `torch.compile` on, for `compile_methods`.

Time, by construction: small fixed work per path (30 steps of a 60M model, a few 1B forwards,
a 12-step run) so that the whole check is estimated at about 3 minutes on one H100/H200-class
GPU (not yet measured on one), compilation last. `budget_s` (285 s) bounds it: a path is started
only while the time it needs (`reserve_s` of its kind, e.g. 60 s for a compilation) is left, and
a path not started counts as failed ("out_of_time"), so a run never silently stops short.

Without CUDA the command checks its arguments, says that there is no CUDA device and exits 0.
`run_gpu_check(config)` is the same body as a function; with `device="cpu"` and tiny shapes it
runs on a CPU (the tests do), every path included.

Output: DIR/gpu_check.json (schema below, `JSON_SCHEMA`) and a short table; the command exits 1
when any path failed or ran out of time, 0 otherwise.

JSON schema "rankscope-gpu-check/1":
    schema, ok (bool: no path failed or ran out of time), counts {ok, failed, skipped, out_of_time},
    device {name, count, capability, total_memory_bytes, peak_bf16_tflops}, environment, settings,
    wall_s, paths: [{path, kind, status (ok | failed | skipped | out_of_time), seconds, error,
    metrics}], the metrics of each kind as listed in `JSON_SCHEMA["metrics"]`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rankscope.bench.common import (
    Column,
    environment,
    format_value,
    geometric_mean,
    median,
    print_table,
    synchronize,
    time_calls,
    write_json,
)
from rankscope.errors import ConfigError, RankscopeError, did_you_mean

log = logging.getLogger("rankscope.bench")

SCHEMA_NAME = "rankscope-gpu-check/1"
PRECISIONS = ("bf16-pure", "bf16-autocast")
STATUSES = ("ok", "failed", "skipped", "out_of_time")
LORO_PUBLISHED_SPEEDUP = "2x-4x (LORO Table 3, 1B, batch 64/128, sequence 128-1024)"

JSON_SCHEMA: dict[str, Any] = {
    "top": ("schema", "ok", "counts", "device", "environment", "settings", "wall_s", "paths"),
    "path": ("path", "kind", "status", "seconds", "error", "metrics"),
    "metrics": {
        "train": ("method", "precision", "compiled", "steps", "tokens_per_step", "step_s", "tokens_per_s",
                  "model_flops_per_token", "mfu", "period_setting", "period", "periodic_extra_s",
                  "peak_cuda_bytes", "formula_bytes", "peak_over_formula", "weights_and_state_bytes",
                  "loss_first", "loss_last", "total_params"),
        "infer": ("preset", "dense", "factorized", "dtype", "dense_params", "factorized_params", "points",
                  "speedup_geomean", "published_speedup"),
        "landscape": ("preset", "method", "probe_tokens", "forward_s", "landscape_point_s",
                      "landscape_over_forward", "interpolation_point_s", "interpolation_over_forward"),
        "trainer": ("method", "precision", "steps", "checkpoint_step", "val_loss", "resumed_val_loss"),
        "ddp": ("method", "world_size", "steps", "val_loss", "returncode"),
    },
}


@dataclass
class GpuCheckConfig:
    device: str = "cuda"
    preset: str = "60m"
    methods: str | list[str] = "all"
    precisions: tuple[str, ...] = PRECISIONS
    steps: int = 30  # per training path, warm-up included
    warmup_steps: int = 5
    batch_size: int = 16
    seq_len: int = 256
    period: int = 10  # periodic work (projector refresh, exact step, merge) every `period` steps
    compile_methods: tuple[str, ...] = ("full", "loro")
    compile_backend: str = "inductor"
    infer_preset: str = "1b"
    infer_methods: tuple[str, str] = ("full", "loro")  # (dense, factorized)
    infer_batch_size: int = 64
    infer_seq_lens: tuple[int, ...] = (256, 1024)
    infer_iters: int = 3
    landscape_methods: tuple[str, ...] = ("full", "loro")
    probe_sequences: int = 64
    trainer_method: str = "galore"
    trainer_steps: int = 12
    ddp_method: str = "loro"
    ddp_steps: int = 10
    ddp_processes: int | None = None  # None: every visible GPU (skipped below two)
    budget_s: float = 285.0
    peak_tflops: float | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    infer_model_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def method_names(self) -> list[str]:
        from rankscope import methods

        if isinstance(self.methods, str):
            names = methods.names() if self.methods.strip() == "all" else [
                m.strip() for m in self.methods.split(",") if m.strip()]
        else:
            names = list(self.methods)
        return names

    def validate(self) -> None:
        """Every argument checked before any work (and before looking for CUDA)."""
        from rankscope import methods
        from rankscope.models import get_preset

        for key in ("steps", "batch_size", "seq_len", "period", "infer_batch_size", "infer_iters",
                    "probe_sequences", "trainer_steps", "ddp_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"bench gpu: {key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"bench gpu: warmup-steps must be in [0, steps), got {self.warmup_steps} with {self.steps} steps")
        if self.seq_len < 2 or any(t < 2 for t in self.infer_seq_lens) or not self.infer_seq_lens:
            raise ConfigError("bench gpu: sequence lengths must be at least 2 (next-token loss)")
        if self.trainer_steps < 2:
            raise ConfigError("bench gpu: trainer-steps must be at least 2 (a checkpoint half-way, then a resume)")
        if self.budget_s <= 0:
            raise ConfigError(f"bench gpu: budget-s must be positive, got {self.budget_s}")
        if self.ddp_processes is not None and self.ddp_processes < 1:
            raise ConfigError(f"bench gpu: ddp-processes must be at least 1, got {self.ddp_processes}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"bench gpu: --peak-tflops must be positive, got {self.peak_tflops}")
        for precision in self.precisions:
            if precision not in PRECISIONS:
                raise ConfigError(f"bench gpu: precision {precision!r} is not one of {', '.join(PRECISIONS)}"
                                  f"{did_you_mean(precision, PRECISIONS)}")
        for preset in (self.preset, self.infer_preset):
            get_preset(preset)
        names = self.method_names()
        if not names:
            raise ConfigError("bench gpu: --methods is empty; pass 'all' or a comma-separated list")
        for name in [*names, *self.compile_methods, *self.infer_methods, *self.landscape_methods,
                     self.trainer_method, self.ddp_method]:
            methods.get(name)  # unknown names: a did-you-mean error
        if len(self.infer_methods) != 2:
            raise ConfigError("bench gpu: infer methods are a pair (dense, factorized), e.g. full,loro")
        device = torch.device(self.device) if self.device in ("cpu", "cuda") or self.device.startswith("cuda:") else None
        if device is None:
            raise ConfigError(f"bench gpu: device {self.device!r} is not cuda, cuda:N (or cpu for the tests)")


# ---------------------------------------------------------------------------------------------
# paths


@dataclass
class PathResult:
    path: str
    kind: str
    status: str
    seconds: float
    error: str | None
    metrics: dict[str, Any]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _start_peak(device: torch.device) -> int:
    _free(device)
    if device.type != "cuda":
        return 0
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_since(device: torch.device, baseline: int) -> int | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline


def _require_finite(values: list[float], what: str) -> None:
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise RankscopeError(f"{what} is not finite at step {bad[0]} (of {len(values)})")


def train_path(config: GpuCheckConfig, method: str, precision: str, compiled: bool,
               device: torch.device, peak_tflops: float | None) -> dict[str, Any]:
    """A few dozen trainer steps of one method: throughput, MFU, peak memory vs the formula."""
    from rankscope.bench.flops import mfu, model_flops
    from rankscope.bench.train import build_method_run, random_batches, summarize, train_step
    from rankscope.methods.memory import account_memory

    baseline = _start_peak(device)
    run = build_method_run(config.preset, method, config.batch_size, config.seq_len, config.model_overrides,
                           device, precision, config.seed, period=config.period)
    if compiled:
        run.forward_model = torch.compile(run.model, backend=config.compile_backend)
    batches = random_batches(run.model_config.vocab_size, config.batch_size, config.seq_len, 4, config.seed, device)
    losses = []
    for index in range(config.steps):
        sample = train_step(run, batches[index % len(batches)])
        losses.append(sample.pop("loss"))
        if index >= config.warmup_steps:
            run.samples.append(sample)
    peak = _peak_since(device, baseline)
    losses = [float(loss) for loss in losses]
    _require_finite(losses, f"{method} {precision} training loss")
    with torch.no_grad():
        bad = [n for n, p in run.model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise RankscopeError(f"{method} {precision}: non-finite weights after {config.steps} steps, e.g. {bad[0]}")

    tokens_per_step = config.batch_size * config.seq_len
    summary = summarize(run, tokens_per_step)
    memory = account_memory(run.model, run.optimizer)
    flops = model_flops(run.model, config.batch_size, config.seq_len).training_per_token
    formula = memory["estimated_memory_bytes"]
    return {
        "method": method, "precision": precision, "compiled": compiled, "steps": config.steps,
        "tokens_per_step": tokens_per_step, "step_s": summary["step_s"], "tokens_per_s": summary["tokens_per_s"],
        "model_flops_per_token": flops,
        "mfu": mfu(flops, summary["tokens_per_s"], peak_tflops) if peak_tflops else None,
        "period_setting": summary["period_setting"], "period": summary["period_timed"],
        "periodic_extra_s": summary["periodic_extra_s"],
        "peak_cuda_bytes": peak, "formula_bytes": formula,
        "peak_over_formula": peak / formula if peak is not None else None,
        "weights_and_state_bytes": memory["param_bytes"] + memory["optimizer_state_bytes"],
        "loss_first": losses[0], "loss_last": losses[-1], "total_params": memory["total_params"],
    }


def build_on_device(preset: str, method: str, overrides: dict[str, Any], device: torch.device,
                    dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A method's initial model created directly on the device (a 1B model in seconds)."""
    from rankscope.bench.train import build_config
    from rankscope.models import get_preset
    from rankscope.train.setup import build_run_model, resolve_model_config

    cfg = build_config(preset, method, 1, 2, overrides)
    vocab = int(overrides.get("vocab_size", get_preset(preset).vocab_size))
    with torch.device(device):
        model, _ = build_run_model(cfg, resolve_model_config(cfg, vocab), seed=seed)
    model.to(dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def infer_path(config: GpuCheckConfig, device: torch.device) -> dict[str, Any]:
    """Dense vs factorized forward latency at the inference preset, bf16."""
    dense_name, factorized_name = config.infer_methods
    dtype = torch.bfloat16
    models = {name: build_on_device(config.infer_preset, name, config.infer_model_overrides, device, dtype, config.seed)
              for name in config.infer_methods}
    vocab = models[dense_name].config.vocab_size
    generator = torch.Generator().manual_seed(config.seed)
    points = []
    for seq_len in config.infer_seq_lens:
        tokens = torch.randint(0, vocab, (config.infer_batch_size, seq_len), generator=generator).to(device)
        latency = {}
        with torch.inference_mode():
            for name, model in models.items():
                latency[name] = median(time_calls(lambda model=model: model(tokens), device, 1, config.infer_iters))
        points.append({"batch_size": config.infer_batch_size, "seq_len": seq_len,
                       "dense_s": latency[dense_name], "factorized_s": latency[factorized_name],
                       "speedup": latency[dense_name] / latency[factorized_name]})
    params = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    del models
    return {"preset": config.infer_preset, "dense": dense_name, "factorized": factorized_name, "dtype": "bf16",
            "dense_params": params[dense_name], "factorized_params": params[factorized_name], "points": points,
            "speedup_geomean": geometric_mean(p["speedup"] for p in points),
            "published_speedup": LORO_PUBLISHED_SPEEDUP}


def landscape_path(config: GpuCheckConfig, method: str, device: torch.device) -> dict[str, Any]:
    """One landscape / interpolation point against one plain forward over the probe set."""
    from rankscope.analysis.pipeline import measure_point_cost

    model = build_on_device(config.preset, method, config.model_overrides, device, torch.float32, config.seed)
    probe = torch.randint(0, model.config.vocab_size, (config.probe_sequences, config.seq_len),
                          generator=torch.Generator().manual_seed(config.seed))
    cost = measure_point_cost(model, probe, batch_size=min(32, config.probe_sequences), device=device,
                              repeats=3, seed=config.seed)
    return {"preset": config.preset, "method": method, "probe_tokens": probe.numel(),
            "forward_s": cost["forward_s"], "landscape_point_s": cost["landscape_point_s"],
            "landscape_over_forward": cost["landscape_point_s"] / cost["forward_s"],
            "interpolation_point_s": cost["interpolation_point_s"],
            "interpolation_over_forward": cost["interpolation_point_s"] / cost["forward_s"]}


def trainer_run_args(config: GpuCheckConfig, method: str, steps: int, device: str, precision: str,
                     checkpoint_steps: list[int], batch_size: int) -> list[str]:
    """`rankscope train` options shared by the trainer and DDP paths (embedded corpus, same data
    config, so the DDP processes find the token shards the trainer path prepared)."""
    overrides = [f"model.overrides={json.dumps(config.model_overrides)}", f"data.seq_len={config.seq_len}",
                 "data.val_sequences=32", "data.probe_sequences=16", f"train.checkpoint_steps={checkpoint_steps}",
                 f"train.eval_every={steps}", "train.log_every=5"]
    args = ["--preset", config.preset, "--method", method, "--steps", str(steps), "--device", device,
            "--precision", precision, "--batch-size", str(batch_size), "--seed", str(config.seed)]
    for item in overrides:
        args += ["--set", item]
    return args


def trainer_path(config: GpuCheckConfig, device: torch.device, work: Path) -> dict[str, Any]:
    """The real trainer on the device, then a resume as after a preemption: the checkpoints after
    the half-way one are removed and the same command continues from there to the end."""
    import shutil

    from rankscope.cli import build_parser, config_from_args
    from rankscope.train import checkpoint as ckpt
    from rankscope.train import train

    half, steps, precision = config.trainer_steps // 2, config.trainer_steps, "bf16-pure"
    run_dir = work / "trainer"
    args = build_parser().parse_args(
        ["train", *trainer_run_args(config, config.trainer_method, steps, str(device), precision, [half, steps],
                                    config.batch_size)])
    cfg = config_from_args(args)
    uninterrupted = train(cfg, run_dir)
    for info in ckpt.list_checkpoints(run_dir):
        if info.step > half:
            shutil.rmtree(info.path)
    (run_dir / "summary.json").unlink()
    resumed = train(cfg, run_dir)
    _require_finite([uninterrupted["val_loss"], resumed["val_loss"]], "trainer validation loss")
    if resumed["steps"] != steps:
        raise RankscopeError(f"the resumed run stopped at step {resumed['steps']}, not {steps}")
    return {"method": config.trainer_method, "precision": precision, "steps": steps, "checkpoint_step": half,
            "val_loss": uninterrupted["val_loss"], "resumed_val_loss": resumed["val_loss"]}


def ddp_path(config: GpuCheckConfig, device: torch.device, processes: int, work: Path,
             timeout_s: float) -> dict[str, Any]:
    """`torchrun` with one process per GPU running `rankscope train` (DistributedDataParallel)."""
    run_dir = work / "ddp"
    device_arg = "cuda" if device.type == "cuda" else "cpu"
    precision = "bf16-autocast" if device.type == "cuda" else "fp32"
    batch_size = processes * max(1, config.batch_size // processes)  # the global batch splits evenly
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "rankscope", "train",
               *trainer_run_args(config, config.ddp_method, config.ddp_steps, device_arg, precision,
                                 [config.ddp_steps], batch_size),
               "--out", str(run_dir)]
    env = dict(os.environ)
    source = str(Path(__file__).resolve().parents[2])  # this checkout's code in the children too
    env["PYTHONPATH"] = source + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    # Its own process group, so that a timeout ends torchrun and every worker it started.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise RankscopeError(f"torchrun did not finish within the {timeout_s:.0f}s left of the budget") from None
    if process.returncode != 0:
        tail = output.strip().splitlines()[-3:]
        raise RankscopeError(f"torchrun exited with {process.returncode}: {' | '.join(tail)}")
    summary = json.loads((run_dir / "summary.json").read_text())
    _require_finite([summary["val_loss"]], "DDP validation loss")
    return {"method": config.ddp_method, "world_size": processes, "steps": summary["steps"],
            "val_loss": summary["val_loss"], "returncode": process.returncode}


# ---------------------------------------------------------------------------------------------
# the check


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
        _free(device)
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


def summary_line(result: dict[str, Any]) -> str:
    """The few figures of a path that fit on one line."""
    m = result["metrics"]
    if result["status"] != "ok":
        return (result["error"] or "")[:100]
    if result["kind"] == "train":
        mfu = f", MFU {format_value(m['mfu'], 'percent')}" if m["mfu"] is not None else ""
        peak = (f", peak {format_value(m['peak_cuda_bytes'], 'bytes')} (formula {format_value(m['formula_bytes'], 'bytes')})"
                if m["peak_cuda_bytes"] is not None else "")
        return f"{m['tokens_per_s']:,.0f} tok/s{mfu}{peak}, loss {m['loss_first']:.2f} -> {m['loss_last']:.2f}"
    if result["kind"] == "infer":
        return (f"{m['dense']} / {m['factorized']} latency {format_value(m['speedup_geomean'], 'ratio')} "
                f"(published {m['published_speedup'].split(' ')[0]})")
    if result["kind"] == "landscape":
        return f"landscape point = {m['landscape_over_forward']:.2f} forwards"
    if result["kind"] == "trainer":
        return f"val loss {m['val_loss']:.3f}, {m['resumed_val_loss']:.3f} resumed from step {m['checkpoint_step']}"
    return f"{m['world_size']} processes, val loss {m['val_loss']:.3f}"


def print_summary(payload: dict[str, Any]) -> None:
    rows = [{**r, "summary": summary_line(r)} for r in payload["paths"]]
    counts = payload["counts"]
    print_table(
        f"bench gpu on {payload['device']['name']}: {counts['ok']} ok, {counts['failed']} failed, "
        f"{counts['skipped']} skipped, {counts['out_of_time']} out of time, {payload['wall_s']:.0f}s",
        rows,
        [Column("path", "path", "text"), Column("status", "status", "text"), Column("seconds", "time", "seconds"),
         Column("summary", "figures", "text")],
    )
    if "file" in payload:
        print(f"gpu check json: {payload['file']}")
    print("gpu check: " + ("every path passed" if payload["ok"] else "FAILED (see the table and the JSON)"))
