"""`rankscope bench train`: cost of one training step of every method next to full-rank.

Per method, on the same preset, batch and (random) tokens:
- seconds per optimizer step (forward+backward, gradient clipping + the method's `before_update` +
  optimizer.step, the method's `after_step`), each phase timed on its own, medians over the steady steps after warm-up;
- periodic work (GaLore/Fira projector refresh, LORO's exact step, ReLoRA's merge): the method's
  period setting is shrunk to `period` steps so the periodic steps recur often enough to time;
  the extra seconds of a periodic step over a steady one are reported, and the step time
  amortized at the method's own (literature) period;
- peak memory: CUDA max allocated (in process, one method at a time); on CPU the peak RSS of a
  fresh spawned process per method, and the RSS of an idle process with torch imported;
- parameters and optimizer-state bytes from the real tensors (`account_memory`);
- model FLOPs per token (`flops.model_flops`) and, with a known or given peak, MFU;
- the cost of live training dynamics (`rankscope.train.dynamics`): the same steps again with a
  measurement at every step, the extra seconds of a measured step over a plain one, and that
  extra amortized at the default period `train.dynamics_every` as a fraction of the step time.

The tokens are random ids: the cost of a step does not depend on their values, and the
benchmark then needs no corpus or tokenizer.

One method's model and optimizer exist at a time: each (method, repeat) builds the method afresh
(the same seed, so the same start), warms it up, times it and frees it before the next is built.
Keeping every method resident would let the repeats continue where they stopped, but at 1B that is
10-21 GB per method, so all of them would not fit on one GPU. Rebuilding costs the build and the
warm-up steps once per repeat (untimed; with `--compile` a fresh compilation each time), and keeps
the interleaving: the repeats still rotate the order of the methods (`run_alternating`), so drift
in the machine's speed is shared among them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import logging
import multiprocessing
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankscope.bench.common import (
    BenchResult,
    Column,
    RatioPlot,
    add_ratios,
    environment,
    median,
    print_table,
    resolve_bench_device,
    run_alternating,
    select_methods,
    synchronize,
    write_result,
)
from rankscope.bench.flops import lookup_peak_tflops, mfu, model_flops
from rankscope.errors import ConfigError
from rankscope.methods.memory_accounting import account_memory

log = logging.getLogger("rankscope.bench")

@dataclass
class TrainBenchConfig:
    preset: str = "tiny"
    methods: str | list[str] = "all"
    device: str = "cpu"
    batch_size: int = 8
    seq_len: int = 128
    warmup_steps: int = 3
    steps: int = 12  # timed steps per method and repeat
    repeats: int = 3
    period: int = 4  # period used while timing periodic work
    precision: str | None = None  # fp32 on CPU, bf16-autocast on CUDA unless given
    compile: bool = False
    peak_tflops: float | None = None
    memory: bool = True
    memory_steps: int = 3
    model_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    dynamics: bool = True  # also time steps with a dynamics measurement

    def resolved_precision(self, device: torch.device) -> str:
        if self.precision is not None:
            if self.precision not in ("fp32", "bf16-autocast", "bf16-pure"):
                raise ConfigError(f"--precision {self.precision!r} is not one of fp32, bf16-autocast, bf16-pure")
            return self.precision
        return "bf16-autocast" if device.type == "cuda" else "fp32"

    def validate(self) -> None:
        for key in ("batch_size", "seq_len", "steps", "repeats", "period", "memory_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"bench train: {key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"bench train: warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.period < 2:
            raise ConfigError("bench train: --period must be at least 2 (periodic and steady steps must alternate)")


# ---------------------------------------------------------------------------------------------
# one method's run


def _method_of(settings: Any) -> Any:
    """The registered method whose Settings class `settings` is an instance of (exact type)."""
    from rankscope import methods

    for name in methods.names():
        cls = methods.get(name)
        if type(settings) is cls.Settings:
            return cls
    return None


def period_setting(settings: Any, method_cls: Any = None) -> tuple[str, int] | None:
    """(setting name, value) of the setting the method declares as its period
    (`Method.period_setting`), or None: no periodic work, or the run turned it off (value <= 0).
    Without `method_cls`, the method is the one whose Settings class `settings` is."""
    if settings is None:
        return None
    method_cls = method_cls or _method_of(settings)
    name = getattr(method_cls, "period_setting", None)
    if name is None:
        return None
    value = getattr(settings, name)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return name, value
    return None


def build_config(preset: str, method: str, batch_size: int, seq_len: int,
                 model_overrides: dict[str, Any], method_overrides: dict[str, Any] | None = None):
    from rankscope.config import build_config as build_run_config

    return build_run_config({
        "model": {"preset": preset, "overrides": dict(model_overrides)},
        "method": {"name": method, **(method_overrides or {})},
        "data": {"seq_len": seq_len},
        # A long nominal run: the cosine schedule is then in its flat part while we time.
        "train": {"batch_size": batch_size, "steps": 100_000, "device": "cpu"},
    })


def shortened_period_overrides(cfg, period: int) -> dict[str, Any]:
    """Method overrides that make the periodic work recur every `period` steps.

    The method's warm-up settings (`Method.warmup_settings`: ReLoRA's restart_warmup, LORO's
    rewarm_steps) are cut below the period, since methods require them to fit inside it; they
    change the learning rate only, never the cost of a step.
    """
    from rankscope import methods

    method_cls = methods.get(cfg.method.name)
    found = period_setting(cfg.method.settings, method_cls)
    if found is None:
        return {}
    overrides: dict[str, Any] = {found[0]: period}
    for name in method_cls.warmup_settings:
        value = getattr(cfg.method.settings, name)
        if isinstance(value, int) and not isinstance(value, bool):
            overrides[name] = min(value, period - 1)
    return overrides


@dataclass
class MethodRun:
    """A method's model, optimizer and step counter, alive for one repeat of the benchmark."""

    name: str
    cfg: Any
    model_config: Any
    model: nn.Module
    forward_model: nn.Module
    method: Any
    optimizer: torch.optim.Optimizer
    optim: Any
    precision: str
    device: torch.device
    period: tuple[str, int, int] | None = None  # (setting, period used, the method's own period)
    period_note: str = ""
    step: int = 0
    samples: list[dict[str, float]] = field(default_factory=list)
    dynamics_samples: list[dict[str, float]] = field(default_factory=list)
    monitor: Any = None  # a DynamicsMonitor measuring at every step, for the dynamics timing


def build_for_training(cfg, model_config, seed: int, precision: str, device: torch.device,
                       on_device: bool = False) -> tuple[torch.nn.Module, Any, torch.optim.Optimizer, Any]:
    """The run's model (in the precision's dtype, on `device`), method, optimizer and resolved
    optimizer settings, as the trainer builds them. `on_device` creates the weights on the device."""
    from rankscope.train.setup import build_run_model, build_run_optimizer, resolve_optim

    with torch.device(device) if on_device else contextlib.nullcontext():
        model, method = build_run_model(cfg, model_config, seed=seed)
    if precision == "bf16-pure":
        model.to(torch.bfloat16)
    model.to(device)
    optim = resolve_optim(cfg, type(method))
    optimizer = build_run_optimizer(method, model, optim)
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    return model, method, optimizer, optim


def build_method_run(
    preset: str, method_name: str, batch_size: int, seq_len: int, model_overrides: dict[str, Any],
    device: torch.device, precision: str, seed: int, period: int | None, compile_model: bool = False,
) -> MethodRun:
    """Build the method's parameterized model and optimizer as the trainer does."""
    from rankscope import methods
    from rankscope.models import get_preset
    from rankscope.train.setup import build_method, resolve_model_config

    cfg = build_config(preset, method_name, batch_size, seq_len, model_overrides)
    vocab = int(model_overrides.get("vocab_size", get_preset(preset).vocab_size))
    own_period = period_setting(cfg.method.settings, methods.get(method_name))
    period_info = None
    note = ""
    if period is not None and own_period is not None:
        shortened = shortened_period_overrides(cfg, period)
        try:
            trial = build_config(preset, method_name, batch_size, seq_len, model_overrides, shortened)
            build_method(trial, resolve_model_config(trial, vocab))  # runs validate()
            cfg = trial
            period_info = (own_period[0], period, own_period[1])
        except ConfigError as exc:
            note = f"periodic work not timed: {method_name} rejects {own_period[0]}={period} ({exc})"
            log.warning(note)
    model_config = resolve_model_config(cfg, vocab)
    model, method, optimizer, optim = build_for_training(cfg, model_config, seed, precision, device)
    forward_model = torch.compile(model) if compile_model else model
    model.train()
    return MethodRun(method_name, cfg, model_config, model, forward_model, method, optimizer, optim,
                     precision, device, period_info, note)


@dataclass
class MethodTimings:
    """What a method's repeats leave behind once its model is freed: the timed samples and the
    period they were taken at (`summarize` reads it as it reads a MethodRun)."""

    name: str
    period: tuple[str, int, int] | None = None
    period_note: str = ""
    samples: list[dict[str, float]] = field(default_factory=list)
    dynamics_samples: list[dict[str, float]] = field(default_factory=list)

    def add(self, run: MethodRun) -> None:
        self.period, self.period_note = run.period, run.period_note
        self.samples += run.samples
        self.dynamics_samples += run.dynamics_samples


def release_memory(device: torch.device) -> None:
    """Return a freed run's memory: collect reference cycles, and hand cached CUDA blocks back so
    that the next method starts from the same free memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_batches(vocab_size: int, batch_size: int, seq_len: int, count: int, seed: int,
                   device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device) for _ in range(count)]


def train_step(run: MethodRun, batch: torch.Tensor, monitor: Any = None) -> dict[str, float]:
    """One trainer step (same phases as `rankscope.train.trainer`), each phase timed; with a
    `monitor`, its two calls sit where the trainer makes them."""
    from rankscope.models import token_losses
    from rankscope.train.setup import autocast_context

    device = run.device
    synchronize(device)
    start = time.perf_counter()
    multiplier = run.method.lr_multiplier(run.step, run.optim)
    for group in run.optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
    with autocast_context(device, run.precision):
        loss = token_losses(run.forward_model, batch).mean()
        loss.backward()
    if monitor is not None:
        monitor.before_update(run.step + 1, loss.detach())
    synchronize(device)
    after_backward = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(
        [p for p in run.model.parameters() if p.requires_grad],
        run.optim.grad_clip if run.optim.grad_clip > 0 else float("inf"),
    )
    run.method.before_update(run.step + 1, run.model, run.optimizer)  # SwitchLoRA's switches: in the optimizer phase
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    after_optimizer = time.perf_counter()
    run.method.after_step(run.step + 1, run.model, run.optimizer)
    if monitor is not None:
        monitor.after_update(run.step + 1)
    synchronize(device)
    end = time.perf_counter()
    sample = {
        "step": run.step,
        "total": end - start,
        "forward_backward": after_backward - start,
        "optimizer": after_optimizer - after_backward,
        "after_step": end - after_optimizer,
        "loss": loss.detach(),  # a tensor: reading it here would add a sync to the timed step
    }
    run.step += 1
    return sample


def split_periodic(samples: list[dict[str, float]], period: int | None) -> tuple[list[dict], list[dict], int | None]:
    """(steady samples, periodic samples, phase) for steps that do periodic work every `period`.

    Methods count their period differently (GaLore refreshes before the update of steps 0, T, ...,
    LORO after steps K, 2K, ...), so the periodic phase is found from the data: of the `period`
    residues of the step index, the one with the slowest median step.
    """
    if not period:
        return samples, [], None
    by_phase: dict[int, list[dict]] = {}
    for sample in samples:
        by_phase.setdefault(int(sample["step"]) % period, []).append(sample)
    if len(by_phase) < 2:
        return samples, [], None
    phase = max(by_phase, key=lambda p: median(s["total"] for s in by_phase[p]))
    steady = [s for p, group in by_phase.items() if p != phase for s in group]
    return steady, by_phase[phase], phase


# ---------------------------------------------------------------------------------------------
# peak memory


def _idle_rss_worker(threads: int) -> int:
    """Peak RSS of a process that has imported torch and rankscope and done nothing else."""
    import resource

    import torch as _torch

    import rankscope.models  # noqa: F401

    _torch.set_num_threads(threads)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: build the method, run a few steps, report peak RSS and accounting."""
    import resource

    torch.set_num_threads(spec["threads"])
    device = torch.device("cpu")
    run = build_method_run(spec["preset"], spec["method"], spec["batch_size"], spec["seq_len"],
                           spec["model_overrides"], device, spec["precision"], spec["seed"], period=None)
    vocab = run.model_config.vocab_size
    for batch in random_batches(vocab, spec["batch_size"], spec["seq_len"], spec["steps"], spec["seed"], device):
        train_step(run, batch)
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _in_fresh_process(fn, *args) -> Any:
    # spawn, never fork: a forked child inherits the parent's pages (and its peak RSS).
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def measure_cpu_memory(config: TrainBenchConfig, names: list[str], precision: str) -> tuple[dict[str, dict], int]:
    threads = torch.get_num_threads()
    idle = _in_fresh_process(_idle_rss_worker, threads)
    results = {}
    for name in names:
        spec = {
            "preset": config.preset, "method": name, "batch_size": config.batch_size, "seq_len": config.seq_len,
            "model_overrides": dict(config.model_overrides), "precision": precision, "seed": config.seed,
            "steps": config.memory_steps, "threads": threads,
        }
        results[name] = _in_fresh_process(_memory_worker, spec)
        log.info("bench train: %s peak RSS %.1f MiB", name, results[name]["peak_rss_bytes"] / 2**20)
    return results, idle


def measure_cuda_memory(config: TrainBenchConfig, names: list[str], device: torch.device,
                        precision: str) -> dict[str, dict]:
    """Peak CUDA allocation of each method alone: built, stepped, freed, one after another."""
    results = {}
    for name in names:
        gc.collect()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run = build_method_run(config.preset, name, config.batch_size, config.seq_len, config.model_overrides,
                               device, precision, config.seed, period=None)
        for batch in random_batches(run.model_config.vocab_size, config.batch_size, config.seq_len,
                                    config.memory_steps, config.seed, device):
            train_step(run, batch)
        synchronize(device)
        results[name] = {"peak_cuda_bytes": torch.cuda.max_memory_allocated(device) - baseline}
        del run
    gc.collect()
    torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------------------------------------
# the benchmark


def summarize(run: MethodRun | MethodTimings, tokens_per_step: int) -> dict[str, Any]:
    period = run.period[1] if run.period else None
    steady, periodic, phase = split_periodic(run.samples, period)
    step_s = median(s["total"] for s in steady)
    record: dict[str, Any] = {
        "method": run.name,
        "step_s": step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "forward_backward_s": median(s["forward_backward"] for s in steady),
        "optimizer_s": median(s["optimizer"] for s in steady),
        "after_step_s": median(s["after_step"] for s in steady),
        "timed_steps": len(run.samples),
        "period_setting": run.period[0] if run.period else None,
        "period_timed": period,
        "period_literature": run.period[2] if run.period else None,
        "periodic_phase": phase,
        "periodic_note": run.period_note or None,
    }
    if periodic:
        periodic_step = median(s["total"] for s in periodic)
        extra = periodic_step - step_s
        literature = run.period[2]
        record.update({
            "periodic_step_s": periodic_step,
            "periodic_extra_s": extra,
            "periodic_after_step_s": median(s["after_step"] for s in periodic),
            "periodic_optimizer_s": median(s["optimizer"] for s in periodic),
            "amortized_step_s": step_s + extra / literature,
        })
    else:
        record.update({"periodic_step_s": None, "periodic_extra_s": None, "periodic_after_step_s": None,
                       "periodic_optimizer_s": None, "amortized_step_s": step_s})
    record["amortized_tokens_per_s"] = tokens_per_step / record["amortized_step_s"]
    record.update(dynamics_overhead(run, step_s))
    return record


def dynamics_overhead(run: MethodRun | MethodTimings, step_s: float) -> dict[str, Any]:
    """Extra seconds of a step that measures the dynamics, and that extra at the default period
    as a fraction of a plain step (what `train.dynamics_every` costs a run)."""
    from rankscope.config import TrainConfig

    default_period = TrainConfig().dynamics_every
    if not run.dynamics_samples:
        return {"dynamics_extra_s": None, "dynamics_period": default_period, "dynamics_overhead": None}
    period = run.period[1] if run.period else None
    steady, _, _ = split_periodic(run.dynamics_samples, period)
    extra = median(s["total"] for s in steady) - step_s
    return {
        "dynamics_step_s": median(s["total"] for s in steady), "dynamics_extra_s": extra,
        "dynamics_period": default_period,
        "dynamics_overhead": extra / (default_period * step_s) if default_period else 0.0,
    }


COLUMNS = [
    Column("method", "method", "text"),
    Column("total_params", "params", "count"),
    Column("step_s", "step", "seconds"),
    Column("step_s_ratio", "step/full", "ratio"),
    Column("tokens_per_s", "tokens/s", "number"),
    Column("forward_backward_s", "fwd+bwd", "seconds"),
    Column("optimizer_s", "optim", "seconds"),
    Column("after_step_s", "after_step", "seconds"),
    Column("periodic_extra_s", "periodic +", "seconds"),
    Column("period_literature", "T", "count"),
    Column("amortized_step_s", "step @T", "seconds"),
    Column("amortized_step_s_ratio", "@T/full", "ratio"),
    Column("peak_memory_bytes", "peak mem", "bytes"),
    Column("peak_memory_bytes_ratio", "mem/full", "ratio"),
    Column("optimizer_state_bytes", "optim state", "bytes"),
    Column("optimizer_state_bytes_ratio", "state/full", "ratio"),
    Column("mfu", "MFU", "percent"),
    Column("dynamics_extra_s", "dynamics +", "seconds"),
    Column("dynamics_overhead", "dynamics @period", "percent"),
]

RATIO_METRICS = ("step_s", "amortized_step_s", "tokens_per_s", "amortized_tokens_per_s", "forward_backward_s",
                 "optimizer_s", "peak_memory_bytes", "total_params", "trainable_params", "optimizer_state_bytes",
                 "estimated_memory_bytes", "model_flops_per_token")


def run_train_bench(config: TrainBenchConfig, out_dir=None, show: bool = True) -> BenchResult:
    config.validate()
    device = resolve_bench_device(config.device)
    precision = config.resolved_precision(device)
    names = select_methods(config.methods)
    tokens_per_step = config.batch_size * config.seq_len
    started = time.perf_counter()

    memory: dict[str, dict] = {}
    idle_rss = None
    if config.memory:
        if device.type == "cuda":
            memory = measure_cuda_memory(config, names, device, precision)
        else:
            memory, idle_rss = measure_cpu_memory(config, names, precision)

    timings = {name: MethodTimings(name) for name in names}
    # Read off each method's tensors before they are freed: parameters, optimizer state, FLOPs.
    accounting: dict[str, dict[str, Any]] = {}
    batches: list[torch.Tensor] = []

    def measure(name: str, repeat: int) -> None:
        # Built for this repeat and freed at its end: one method's model is alive at a time.
        if config.compile:
            # Every build compiles the same forward code again; without a reset, methods x repeats
            # builds would pass dynamo's recompile limit and fall back to eager. Compiling happens in
            # the untimed warm-up steps.
            torch._dynamo.reset()
        run = build_method_run(config.preset, name, config.batch_size, config.seq_len, config.model_overrides,
                               device, precision, config.seed, config.period, config.compile)
        if config.dynamics:
            from rankscope.config import TrainConfig
            from rankscope.train.dynamics import DynamicsMonitor

            run.monitor = DynamicsMonitor(run.model, run.optimizer, TrainConfig(dynamics_every=1), seed=config.seed)
        if not batches:  # every method of a preset has the same vocabulary
            batches.extend(random_batches(run.model_config.vocab_size, config.batch_size, config.seq_len, 4,
                                          config.seed, device))
        for index in range(config.warmup_steps):
            train_step(run, batches[index % len(batches)])
        for index in range(config.steps):
            run.samples.append(train_step(run, batches[index % len(batches)]))
        if run.monitor is not None:  # the same steps with a dynamics measurement at each
            for index in range(config.steps):
                # Cold power iterations (no warm start from the step before): in a run,
                # measurements are a period apart, so this bounds their cost from above.
                run.monitor.vectors.clear()
                run.dynamics_samples.append(train_step(run, batches[index % len(batches)], run.monitor))
        timings[name].add(run)
        if name not in accounting:
            flops = model_flops(run.model, config.batch_size, config.seq_len)
            accounting[name] = {**account_memory(run.model, run.optimizer, config.preset),
                                "model_flops_per_token": flops.training_per_token}
        log.info("bench train: %s repeat %d done", name, repeat + 1)
        del run
        release_memory(device)

    run_alternating(names, config.repeats, measure)

    peak_tflops = config.peak_tflops
    peak_source = "given" if peak_tflops else None
    if peak_tflops is None and device.type == "cuda":
        peak_tflops = lookup_peak_tflops(torch.cuda.get_device_name(device))
        peak_source = "lookup" if peak_tflops else None

    records = []
    for name in names:
        record = summarize(timings[name], tokens_per_step)
        record.update(accounting[name])
        flops_per_token = record["model_flops_per_token"]
        record["achieved_tflops"] = flops_per_token * record["tokens_per_s"] / 1e12
        record["mfu"] = mfu(flops_per_token, record["tokens_per_s"], peak_tflops) if peak_tflops else None
        if name in memory:
            peak = memory[name].get("peak_cuda_bytes", memory[name].get("peak_rss_bytes"))
            record["peak_memory_bytes"] = peak
            record["peak_memory_kind"] = "cuda_max_allocated" if device.type == "cuda" else "peak_rss"
            if idle_rss is not None:
                record["idle_rss_bytes"] = idle_rss
                record["peak_rss_above_idle_bytes"] = peak - idle_rss
        else:
            record["peak_memory_bytes"] = None
        records.append(record)
    add_ratios(records, RATIO_METRICS)

    meta = {
        "benchmark": "train",
        "settings": {**dataclasses.asdict(config), "methods": names, "precision": precision},
        "tokens_per_step": tokens_per_step,
        "peak_tflops": peak_tflops,
        "peak_tflops_source": peak_source,
        "idle_rss_bytes": idle_rss,
        "environment": environment(device),
        "wall_s": time.perf_counter() - started,
        "notes": [
            "step_s: median over steady steps (periodic steps excluded); amortized_step_s adds the "
            "periodic extra divided by the method's own period (period_literature)",
            "tokens are random ids; cost does not depend on token values",
            "dynamics_extra_s: median extra seconds of a step that measures the training dynamics "
            "(spectral norms of every targeted matrix's update, weight and factors); dynamics_overhead: "
            "that extra at the default train.dynamics_every, over the plain step time",
        ],
    }
    result = BenchResult("train", records, meta)
    write_result(result, out_dir, RatioPlot(
        metrics=[("step_s_ratio", "step time (steady)"), ("amortized_step_s_ratio", "step time amortized @T"),
                 ("peak_memory_bytes_ratio", "peak memory"), ("optimizer_state_bytes_ratio", "optimizer state"),
                 ("total_params_ratio", "parameters")],
        title=f"train cost vs full-rank ({config.preset}, {device.type}, batch {config.batch_size}x{config.seq_len})",
    ))
    if show:
        columns = [c for c in COLUMNS if c.key != "mfu" or any(r.get("mfu") is not None for r in records)]
        print_table(f"bench train: preset {config.preset}, {device}, {precision}, "
                    f"{config.batch_size}x{config.seq_len} tokens/step, median of {config.repeats}x{config.steps} steps",
                    records, columns)
        for record in records:
            if record.get("periodic_note"):
                print(f"note: {record['periodic_note']}")
        overheads = [r for r in records if r.get("dynamics_overhead") is not None]
        if overheads:
            period = overheads[0]["dynamics_period"]
            print(f"training dynamics at the default period (train.dynamics_every={period}): overhead "
                  + ", ".join(f"{r['method']} {100 * r['dynamics_overhead']:.2f}%" for r in overheads))
        if idle_rss is not None:
            print(f"peak memory on CPU = peak RSS of a fresh process per method; an idle process with torch "
                  f"imported peaks at {idle_rss / 2**20:.1f} MiB (peak_rss_above_idle_bytes in the JSON)")
    return result
