"""Benchmarks: what every method costs next to full-rank (`rankscope bench ...`).

Sub-benchmarks, each in its own module and each writing DIR/<name>.json, DIR/<name>.csv and a
PNG of ratios to full-rank:
- train: seconds per step, tokens/s, periodic work, peak memory, parameters, optimizer state, MFU;
- infer: forward latency of the final model over a batch x sequence-length grid;
- optimizer: our GaLore / Fira AdamW vs the reference packages; LORO's exact step vs a dense SVD;
- analysis: landscape / interpolation point cost and spectral rows per second;
- gpu (`bench.gpu`, not part of "all"): one check of every GPU-only path, pass/fail per path.
They print figures; nothing here asserts on timings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rankscope.bench.common import BenchResult
from rankscope.errors import ConfigError, did_you_mean

BENCHMARKS = ("train", "infer", "optimizer", "analysis")


def _config_class(name: str) -> type:
    if name == "train":
        from rankscope.bench.train import TrainBenchConfig

        return TrainBenchConfig
    if name == "infer":
        from rankscope.bench.infer import InferBenchConfig

        return InferBenchConfig
    if name == "optimizer":
        from rankscope.bench.optimizer import OptimizerBenchConfig

        return OptimizerBenchConfig
    if name == "analysis":
        from rankscope.bench.analysis import AnalysisBenchConfig

        return AnalysisBenchConfig
    if name == "gpu":
        from rankscope.bench.gpu import GpuCheckConfig

        return GpuCheckConfig
    raise ConfigError(f"unknown benchmark {name!r}{did_you_mean(name, BENCHMARKS)}")


def make_config(name: str, options: dict[str, Any]) -> Any:
    """The benchmark's config from options: None values are skipped (the config's default
    applies); a key the benchmark does not have is a ConfigError, never silently dropped."""
    cls = _config_class(name)
    fields = [f.name for f in dataclasses.fields(cls)]
    foreign = [k for k, v in options.items() if k not in fields and v is not None]
    if foreign:
        raise ConfigError(f"bench {name} has no setting {foreign[0]!r}{did_you_mean(foreign[0], fields)} "
                          f"(its settings: {', '.join(fields)})")
    return cls(**{k: v for k, v in options.items() if v is not None})


def run_benchmark(name: str, options: dict[str, Any] | None = None, out_dir=None, show: bool = True) -> BenchResult:
    """Run one sub-benchmark with the given options (see each module's *BenchConfig)."""
    config = make_config(name, dict(options or {}))
    if name == "train":
        from rankscope.bench.train import run_train_bench

        return run_train_bench(config, out_dir, show)
    if name == "infer":
        from rankscope.bench.infer import run_infer_bench

        return run_infer_bench(config, out_dir, show)
    if name == "optimizer":
        from rankscope.bench.optimizer import run_optimizer_bench

        return run_optimizer_bench(config, out_dir, show)
    from rankscope.bench.analysis import run_analysis_bench

    return run_analysis_bench(config, out_dir, show)


__all__ = ["BENCHMARKS", "BenchResult", "make_config", "run_benchmark"]
