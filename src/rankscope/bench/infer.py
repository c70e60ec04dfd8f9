"""`rankscope bench infer`: forward latency of every method's final model next to full-rank.

The LORO paper's Table 3 protocol (time of the model's forward at batch sizes 64 / 128 and
sequence lengths 128 .. 1024 on one GPU, plus its peak memory) scaled to the device: on CPU a
small grid, on CUDA the paper's grid. Each method's model is measured in the form training
produced (its parameterization: dense for GaLore/Fira, factorized B·A for low-rank/LORO, W0 + BA
for LoRA/ReLoRA, ...); `mergeable` says whether it also has a dense form it could be merged to
for deployment (then it would cost exactly what full-rank costs). Weights are random: the cost
of a forward does not depend on their values. On CUDA the models run in bf16.
"""

from __future__ import annotations

import dataclasses
import logging
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
    geometric_mean,
    median,
    print_table,
    resolve_bench_device,
    run_alternating,
    select_methods,
    synchronize,
    write_result,
)
from rankscope.bench.train import build_config
from rankscope.errors import ConfigError

log = logging.getLogger("rankscope.bench")

CPU_GRID = ((1, 8), (64, 256))
CUDA_GRID = ((64, 128), (128, 256, 512, 1024))  # LORO Table 3


@dataclass
class InferBenchConfig:
    preset: str = "tiny"
    methods: str | list[str] = "all"
    device: str = "cpu"
    batch_sizes: list[int] | None = None
    seq_lens: list[int] | None = None
    iters: int = 5  # forwards timed per sample
    warmup: int = 2
    repeats: int = 3
    precision: str | None = None  # fp32 on CPU, bf16 on CUDA unless given
    compile: bool = False
    model_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def grid(self, device: torch.device) -> tuple[list[int], list[int]]:
        default = CUDA_GRID if device.type == "cuda" else CPU_GRID
        batches = list(self.batch_sizes or default[0])
        lengths = list(self.seq_lens or default[1])
        if any(b < 1 for b in batches) or any(t < 2 for t in lengths):
            raise ConfigError("bench infer: batch sizes must be >= 1 and sequence lengths >= 2")
        return batches, lengths

    def dtype(self, device: torch.device) -> torch.dtype:
        precision = self.precision or ("bf16" if device.type == "cuda" else "fp32")
        choices = {"fp32": torch.float32, "bf16": torch.bfloat16}
        if precision not in choices:
            raise ConfigError(f"bench infer: --precision {precision!r} is not one of fp32, bf16")
        return choices[precision]


def layer_form(model: nn.Module) -> tuple[str, bool]:
    """("dense" or the parameterized layer classes, whether every such layer has a dense form)."""
    from rankscope.nn import ParameterizedLinear

    kinds: list[str] = []
    mergeable = True
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ParameterizedLinear):
                if type(module).__name__ not in kinds:
                    kinds.append(type(module).__name__)
                if mergeable and module.effective_weight() is None:
                    mergeable = False
    return ("dense" if not kinds else "+".join(kinds)), mergeable


def build_inference_model(config: InferBenchConfig, name: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from rankscope.models import get_preset
    from rankscope.train.setup import build_run_model, resolve_model_config

    cfg = build_config(config.preset, name, 1, 2, config.model_overrides)
    vocab = int(config.model_overrides.get("vocab_size", get_preset(config.preset).vocab_size))
    model, _ = build_run_model(cfg, resolve_model_config(cfg, vocab), seed=config.seed)
    model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def run_infer_bench(config: InferBenchConfig, out_dir=None, show: bool = True) -> BenchResult:
    for key in ("iters", "repeats"):
        if getattr(config, key) < 1:
            raise ConfigError(f"bench infer: {key} must be at least 1, got {getattr(config, key)}")
    device = resolve_bench_device(config.device)
    dtype = config.dtype(device)
    batches, lengths = config.grid(device)
    names = select_methods(config.methods)
    started = time.perf_counter()

    models = {name: build_inference_model(config, name, device, dtype) for name in names}
    forwards = {name: (torch.compile(m) if config.compile else m) for name, m in models.items()}
    vocab = models[names[0]].config.vocab_size
    generator = torch.Generator().manual_seed(config.seed)
    grid_rows: list[dict[str, Any]] = []

    for batch_size in batches:
        for seq_len in lengths:
            tokens = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)
            warmed: set[str] = set()
            peaks: dict[str, int] = {}

            def measure(name: str, repeat: int, tokens=tokens, warmed=warmed, peaks=peaks) -> float:
                forward = forwards[name]
                with torch.inference_mode():
                    if name not in warmed:
                        for _ in range(config.warmup):
                            forward(tokens)
                        warmed.add(name)
                    if device.type == "cuda":
                        synchronize(device)
                        before = torch.cuda.memory_allocated(device)
                        torch.cuda.reset_peak_memory_stats(device)
                    times = []
                    for _ in range(config.iters):
                        synchronize(device)
                        start = time.perf_counter()
                        forward(tokens)
                        synchronize(device)
                        times.append(time.perf_counter() - start)
                    if device.type == "cuda":
                        weights = sum(p.numel() * p.element_size() for p in models[name].parameters())
                        peaks[name] = torch.cuda.max_memory_allocated(device) - before + weights
                return median(times)

            samples = run_alternating(names, config.repeats, measure)
            rows = []
            for name in names:
                latency = median(samples[name])
                rows.append({
                    "method": name, "batch_size": batch_size, "seq_len": seq_len, "latency_s": latency,
                    "tokens_per_s": batch_size * seq_len / latency, "peak_memory_bytes": peaks.get(name),
                })
            add_ratios(rows, ("latency_s", "tokens_per_s", "peak_memory_bytes"))
            grid_rows.extend(rows)
            log.info("bench infer: batch %d x seq %d done", batch_size, seq_len)

    largest = (max(batches), max(lengths))
    records = []
    for name in names:
        rows = [r for r in grid_rows if r["method"] == name]
        at_largest = next(r for r in rows if (r["batch_size"], r["seq_len"]) == largest)
        form, mergeable = layer_form(models[name])
        records.append({
            "method": name,
            "form": form,
            "mergeable": mergeable,
            "params": sum(p.numel() for p in models[name].parameters()),
            "latency_geomean_s": geometric_mean(r["latency_s"] for r in rows),
            "latency_largest_s": at_largest["latency_s"],
            "tokens_per_s_largest": at_largest["tokens_per_s"],
            "peak_memory_largest_bytes": at_largest["peak_memory_bytes"],
            "grid_points": len(rows),
        })
    add_ratios(records, ("latency_geomean_s", "latency_largest_s", "tokens_per_s_largest", "params",
                         "peak_memory_largest_bytes"))
    for record in records:
        ratio = record.get("latency_geomean_s_ratio")
        record["speedup_vs_full"] = 1.0 / ratio if ratio else None

    meta = {
        "benchmark": "infer",
        "settings": {**dataclasses.asdict(config), "methods": names, "batch_sizes": batches, "seq_lens": lengths,
                     "dtype": str(dtype).replace("torch.", "")},
        "environment": environment(device),
        "wall_s": time.perf_counter() - started,
        "notes": ["latency: median over repeats of the median of `iters` forwards (logits for every position)",
                  "latency_geomean_s: geometric mean over the batch x seq grid, so its ratio is the mean speedup"],
    }
    result = BenchResult("infer", records, meta, tables={"grid": grid_rows})
    write_result(result, out_dir, RatioPlot(
        metrics=[("latency_geomean_s_ratio", "forward latency (geo-mean over grid)"),
                 ("latency_largest_s_ratio", f"forward latency at batch {largest[0]} x seq {largest[1]}"),
                 ("params_ratio", "parameters")],
        title=f"inference cost vs full-rank ({config.preset}, {device.type}, {meta['settings']['dtype']})",
    ))
    if show:
        print_table(
            f"bench infer: preset {config.preset}, {device}, {meta['settings']['dtype']}, per grid point",
            grid_rows,
            [Column("method", "method", "text"), Column("batch_size", "batch", "count"),
             Column("seq_len", "seq", "count"), Column("latency_s", "latency", "seconds"),
             Column("latency_s_ratio", "lat/full", "ratio"), Column("tokens_per_s", "tokens/s", "number")]
            + ([Column("peak_memory_bytes", "peak mem", "bytes"), Column("peak_memory_bytes_ratio", "mem/full", "ratio")]
               if device.type == "cuda" else []),
        )
        print_table(
            f"bench infer: summary over {len(batches)}x{len(lengths)} grid",
            records,
            [Column("method", "method", "text"), Column("form", "layers", "text"),
             Column("mergeable", "has dense form", "text"), Column("params", "params", "count"),
             Column("latency_geomean_s", "latency (geo-mean)", "seconds"),
             Column("latency_geomean_s_ratio", "lat/full", "ratio"), Column("speedup_vs_full", "speedup", "ratio"),
             Column("tokens_per_s_largest", f"tokens/s @{largest[0]}x{largest[1]}", "number")],
        )
    return result
