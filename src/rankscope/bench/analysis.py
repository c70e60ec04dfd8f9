"""`rankscope bench analysis`: what the geometric analysis costs, per method.

- Landscape and interpolation points: `rankscope.analysis.pipeline.measure_point_cost` times one
  plain forward over the probe set, one landscape point (write θ + α·d from the fp32 master,
  evaluate the probe loss) and one interpolation point (form (1−α)θ_a + αθ_b afresh, evaluate);
  reported in seconds and relative to the plain forward, which is the floor a point can cost.
- Spectral metrics: rows of spectral.csv per second, from `pipeline.spectral_rows` on the
  model (native and merged W and ΔW against a previous checkpoint, and the factors of factored layers), and matrices
  per second of `rankscope.analysis.spectral.spectral_summary` on each targeted weight alone.

Models are freshly initialized (cost does not depend on the values) and the probe set is random
token ids of the configured shape.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

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
    timed,
    write_result,
)
from rankscope.bench.infer import build_inference_model
from rankscope.errors import ConfigError

log = logging.getLogger("rankscope.bench")


@dataclass
class AnalysisBenchConfig:
    preset: str = "tiny"
    methods: str | list[str] = "all"
    device: str = "cpu"
    probe_sequences: int = 16
    seq_len: int = 128
    batch_size: int = 16
    repeats: int = 3  # alternating rounds over the methods
    point_repeats: int = 3  # timings per point inside measure_point_cost
    model_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


def spectral_cost(model: torch.nn.Module, previous: dict[str, dict[str, torch.Tensor]], device: torch.device) -> dict[str, float]:
    """Seconds for all spectral.csv rows of the model, and for spectral_summary per matrix."""
    from rankscope.analysis import pipeline
    from rankscope.analysis.spectral import spectral_summary

    seconds, rows = timed(lambda: pipeline.spectral_rows(model, previous, factors=True), device)
    weights = pipeline.spectral_matrices(model, factors=False)["W"]
    matrices = list(weights.values()) or [t for mats in pipeline.spectral_matrices(model).values() for t in mats.values()]

    def summaries() -> int:
        return sum(len(spectral_summary(W.detach().to(torch.float64))) for W in matrices)

    summary_seconds, summary_values = timed(summaries, device)
    return {
        "spectral_rows": len(rows), "spectral_s": seconds, "spectral_rows_per_s": len(rows) / seconds,
        "summary_matrices": len(matrices), "summary_s": summary_seconds,
        "summary_matrices_per_s": len(matrices) / summary_seconds,
        "summary_values_per_s": summary_values / summary_seconds,
    }


def run_analysis_bench(config: AnalysisBenchConfig, out_dir=None, show: bool = True) -> BenchResult:
    from rankscope.analysis import pipeline
    from rankscope.bench.infer import InferBenchConfig

    for key in ("probe_sequences", "batch_size", "repeats", "point_repeats"):
        if getattr(config, key) < 1:
            raise ConfigError(f"bench analysis: {key} must be at least 1, got {getattr(config, key)}")
    if config.seq_len < 2:
        raise ConfigError("bench analysis: seq-len must be at least 2 (next-token loss)")
    device = resolve_bench_device(config.device)
    names = select_methods(config.methods)
    started = time.perf_counter()
    build = InferBenchConfig(preset=config.preset, model_overrides=config.model_overrides, seed=config.seed)
    models = {name: build_inference_model(build, name, device, torch.float32) for name in names}
    vocab = models[names[0]].config.vocab_size
    probe = torch.randint(0, vocab, (config.probe_sequences, config.seq_len),
                          generator=torch.Generator().manual_seed(config.seed))
    previous: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for name, model in models.items():
        generator = torch.Generator().manual_seed(config.seed + 1)
        # A stand-in for the previous checkpoint: the matrices minus a small random update.
        previous[name] = {
            target: {n: W.detach().cpu() - 1e-3 * torch.randn(W.shape, generator=generator) for n, W in weights.items()}
            for target, weights in pipeline.spectral_matrices(model, factors=False).items()
        }

    def measure(name: str, _repeat: int) -> dict[str, Any]:
        cost = pipeline.measure_point_cost(models[name], probe, batch_size=config.batch_size, device=device,
                                           repeats=config.point_repeats, seed=config.seed)
        cost.update(spectral_cost(models[name], previous[name], device))
        return cost

    samples = run_alternating(names, config.repeats, measure)
    keys = ("forward_s", "landscape_point_s", "interpolation_point_s", "spectral_s", "spectral_rows_per_s",
            "summary_matrices_per_s", "summary_values_per_s")
    records = []
    for name in names:
        first = samples[name][0]
        record: dict[str, Any] = {"method": name, "parameters": first["parameters"], "probe_tokens": first["probe_tokens"],
                                  "spectral_rows": first["spectral_rows"], "summary_matrices": first["summary_matrices"]}
        for key in keys:
            record[key] = median(s[key] for s in samples[name])
        record["landscape_over_forward"] = record["landscape_point_s"] / record["forward_s"]
        record["interpolation_over_forward"] = record["interpolation_point_s"] / record["forward_s"]
        records.append(record)
    add_ratios(records, keys + ("landscape_over_forward", "interpolation_over_forward"))

    meta = {
        "benchmark": "analysis",
        "settings": {**dataclasses.asdict(config), "methods": names},
        "environment": environment(device),
        "wall_s": time.perf_counter() - started,
        "notes": ["*_over_forward: cost of one point relative to one plain forward over the probe set (the floor is 1)",
                  "spectral_rows_per_s: rows of spectral.csv (native and merged W and dW, factors; per matrix, means, pooled) per second"],
    }
    result = BenchResult("analysis", records, meta)
    write_result(result, out_dir, RatioPlot(
        metrics=[("landscape_point_s_ratio", "landscape point"), ("interpolation_point_s_ratio", "interpolation point"),
                 ("forward_s_ratio", "plain forward over probe"), ("spectral_rows_per_s_ratio", "spectral rows/s")],
        title=f"analysis cost vs full-rank ({config.preset}, {device.type}, probe {config.probe_sequences}x{config.seq_len})",
    ))
    if show:
        print_table(
            f"bench analysis: preset {config.preset}, {device}, probe {config.probe_sequences}x{config.seq_len} tokens",
            records,
            [Column("method", "method", "text"), Column("parameters", "params", "count"),
             Column("forward_s", "forward/probe", "seconds"), Column("forward_s_ratio", "fwd/full", "ratio"),
             Column("landscape_point_s", "landscape pt", "seconds"),
             Column("landscape_over_forward", "pt/fwd", "ratio"),
             Column("interpolation_point_s", "interp. pt", "seconds"),
             Column("interpolation_over_forward", "pt/fwd", "ratio"),
             Column("spectral_rows", "spectral rows", "count"),
             Column("spectral_rows_per_s", "rows/s", "number"),
             Column("spectral_rows_per_s_ratio", "rows/s / full", "ratio"),
             Column("summary_matrices_per_s", "summary matrices/s", "number")],
        )
    return result
