"""The paths of the GPU check, each a function returning its metrics (or raising): train,
infer, landscape, the real trainer with a checkpoint resume, DDP under torchrun."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rankscope.bench.common import (
    geometric_mean,
    median,
    synchronize,
    time_calls,
)
from rankscope.bench.gpu.config import LORO_PUBLISHED_SPEEDUP, GpuCheckConfig
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


def free_device(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _start_peak(device: torch.device) -> int:
    free_device(device)
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
    from rankscope.bench.train import (
        build_method_run,
        random_batches,
        summarize,
        train_step,
    )
    from rankscope.methods.memory_accounting import account_memory

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
                latency[name] = median(time_calls(lambda model=model, tokens=tokens: model(tokens), device, 1,
                                                  config.infer_iters))
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


def trainer_overrides(config: GpuCheckConfig, steps: int, checkpoint_steps: list[int]) -> list[str]:
    """The `--set` overrides shared by the trainer and DDP paths (embedded corpus, same data
    config, so the DDP processes find the token shards the trainer path prepared)."""
    return [f"model.overrides={json.dumps(config.model_overrides)}", f"data.seq_len={config.seq_len}",
            "data.val_sequences=32", "data.probe_sequences=16", f"train.checkpoint_steps={checkpoint_steps}",
            f"train.eval_every={steps}", "train.log_every=5"]


def trainer_fields(config: GpuCheckConfig, method: str, steps: int, device: str, precision: str,
                   batch_size: int) -> dict[str, Any]:
    """The run-config keys that trainer_run_args passes as `rankscope train` flags."""
    return {"model.preset": config.preset, "method.name": method, "train.steps": steps, "train.device": device,
            "train.precision": precision, "train.batch_size": batch_size, "train.seed": config.seed}


# The `rankscope train` flag of each key in trainer_fields.
TRAIN_FLAGS = {"model.preset": "--preset", "method.name": "--method", "train.steps": "--steps",
               "train.device": "--device", "train.precision": "--precision", "train.batch_size": "--batch-size",
               "train.seed": "--seed"}


def trainer_run_args(config: GpuCheckConfig, method: str, steps: int, device: str, precision: str,
                     checkpoint_steps: list[int], batch_size: int) -> list[str]:
    """`rankscope train` options shared by the trainer and DDP paths (the DDP path runs the CLI)."""
    args = []
    for key, value in trainer_fields(config, method, steps, device, precision, batch_size).items():
        args += [TRAIN_FLAGS[key], str(value)]
    for item in trainer_overrides(config, steps, checkpoint_steps):
        args += ["--set", item]
    return args


def trainer_path(config: GpuCheckConfig, device: torch.device, work: Path) -> dict[str, Any]:
    """The real trainer on the device, then a resume as after a preemption: the checkpoints after
    the half-way one are removed and the same command continues from there to the end."""
    import shutil

    from rankscope.config import build_config
    from rankscope.train import checkpoint as ckpt
    from rankscope.train import train

    half, steps, precision = config.trainer_steps // 2, config.trainer_steps, "bf16-pure"
    run_dir = work / "trainer"
    # The config `rankscope train` builds from trainer_run_args (the DDP path passes those to the CLI).
    cfg = build_config({}, trainer_overrides(config, steps, [half, steps]), **trainer_fields(
        config, config.trainer_method, steps, str(device), precision, config.batch_size))
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

