"""The benchmark itself: the steps, their floor, the randomized refresh and LORO's exact step, run
in alternating rounds, written and printed."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rankscope.bench.common import (
    BenchResult,
    Column,
    RatioPlot,
    add_ratios,
    environment,
    format_value,
    median,
    print_table,
    resolve_bench_device,
    run_alternating,
    wall_and_cpu,
    write_result,
)
from rankscope.bench.loro_step import CPU_LORO_SIZES, CUDA_LORO_SIZES, loglog_slope, loro_scaling, plot_scaling
from rankscope.bench.optimizer.config import NEVER, OptimizerBenchConfig
from rankscope.bench.optimizer.floor import BACK_PROJECTIONS, RESIDUAL_FAMILIES, Floor
from rankscope.bench.optimizer.implementations import OptimizerRun, implementations, state_bytes
from rankscope.bench.optimizer.svd_refresh import randomized_refresh_rows
from rankscope.bench.optimizer.tensors import bench_tensors, target_shapes
from rankscope.errors import ConfigError

log = logging.getLogger("rankscope.bench")


@dataclass
class Timings:
    """Per key, one (wall, cpu) sample per round, each the median over the round's calls."""

    samples: dict[str, list[tuple[float, float | None]]]

    def stats(self, key: str) -> dict[str, float | None]:
        wall = [w for w, _ in self.samples[key]]
        cpu = [c for _, c in self.samples[key] if c is not None]
        return {"s": median(wall), "min_s": min(wall),
                "cpu_s": median(cpu) if cpu else None, "cpu_min_s": min(cpu) if cpu else None}


def median_sample(calls: list[tuple[float, float | None]]) -> tuple[float, float | None]:
    cpu = [c for _, c in calls if c is not None]
    return median(w for w, _ in calls), (median(cpu) if cpu else None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None



def run_optimizer_bench(config: OptimizerBenchConfig, out_dir=None, show: bool = True) -> BenchResult:
    from rankscope import methods
    from rankscope.models import get_preset

    config.validate()
    device = resolve_bench_device(config.device)
    started = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    model_config = dataclasses.replace(get_preset(config.preset), **config.model_overrides)
    galore_defaults = methods.get("galore").default_settings(config.preset, model_config)
    fira_defaults = methods.get("fira").default_settings(config.preset, model_config)
    rank = config.rank or galore_defaults.rank
    shapes = target_shapes(model_config)
    if rank >= min(min(s) for s in shapes):
        raise ConfigError(f"bench optimizer: rank {rank} must be below the smallest weight side {min(min(s) for s in shapes)}")

    tensors = bench_tensors(model_config, config.seed, device)
    impls, missing = implementations(rank, galore_defaults.scale, fira_defaults.alpha, device,
                                     config.svd_oversample, config.svd_niter)
    gaps = {"galore": galore_defaults.update_proj_gap, "fira": fira_defaults.update_proj_gap,
            "apollo": methods.get("apollo").Settings().update_proj_gap}

    steady = {impl.name: OptimizerRun(impl, tensors, NEVER) for impl in impls}
    refresh = {impl.name: OptimizerRun(impl, tensors, 1) for impl in impls if impl.family and impl.refresh}
    floor = Floor(tensors, rank, device)
    floor_calls: dict[str, Callable[[], None]] = {"adam": floor.adam_step}
    floor_calls["residual-fira"] = floor.residual_passes
    for family, backs in BACK_PROJECTIONS.items():
        floor_calls[f"matmul-{family}"] = lambda backs=backs: floor.matmuls(backs)
        if floor.stacks:
            floor_calls[f"matmul-{family}-batched"] = lambda backs=backs: floor.batched_matmuls(backs)
    for run in list(steady.values()) + list(refresh.values()):
        for _ in range(config.warmup):
            run.step(device)
    for call in floor_calls.values():
        for _ in range(max(config.warmup, 1)):
            call()

    def measure(key: str, _repeat: int) -> tuple[float, float | None]:
        kind, name = key.split(":", 1)
        if kind == "floor":
            return median_sample([wall_and_cpu(floor_calls[name], device) for _ in range(config.steps)])
        run = steady[name] if kind == "steady" else refresh[name]
        calls = config.steps if kind == "steady" else config.refresh_steps
        return median_sample([run.step(device) for _ in range(calls)])

    keys = ([f"steady:{n}" for n in steady] + [f"refresh:{n}" for n in refresh]
            + [f"floor:{n}" for n in floor_calls])
    timings = Timings(run_alternating(keys, config.repeats, measure))
    log.info("bench optimizer: steps timed")

    floor_rows = []
    adam = timings.stats("floor:adam")
    floors: dict[str, dict[str, float | None]] = {}
    for family, backs in BACK_PROJECTIONS.items():
        forms = [timings.stats(f"floor:matmul-{family}")]
        if floor.stacks:
            forms.append(timings.stats(f"floor:matmul-{family}-batched"))
        # The faster form of the matmuls counts, statistic by statistic.
        matmul = {k: min((f[k] for f in forms if f[k] is not None), default=None) for k in adam}
        floors[family] = {k: (adam[k] + matmul[k]) if adam[k] is not None and matmul[k] is not None else None
                          for k in adam}
        row = {"family": family, "back_projections": backs,
               **{f"adam_{k}": v for k, v in adam.items()}, **{f"matmul_{k}": v for k, v in matmul.items()},
               "matmul_per_matrix_s": forms[0]["s"], "matmul_batched_s": forms[1]["s"] if floor.stacks else None,
               **{f"floor_{k}": v for k, v in floors[family].items()}}
        if family in RESIDUAL_FAMILIES:
            residual = timings.stats("floor:residual-fira")
            row.update({f"residual_{k}": v for k, v in residual.items()})
            row.update({f"floor_with_residual_{k}": (floors[family][k] + residual[k]) if residual[k] is not None else None
                        for k in residual})
        floor_rows.append(row)
    floor_by_family = {row["family"]: row for row in floor_rows}

    records = []
    for impl in impls:
        step = timings.stats(f"steady:{impl.name}")
        record: dict[str, Any] = {"method": impl.name, "implementation": impl.description,
                                  **{f"step_{k}": v for k, v in step.items()},
                                  "state_bytes": state_bytes(steady[impl.name].optimizer),
                                  "floor_s": None, "floor_cpu_s": None, "step_over_floor": None,
                                  "step_over_floor_min": None, "step_over_floor_cpu": None,
                                  "refresh_step_s": None, "refresh_extra_s": None, "gap": None,
                                  "amortized_step_s": step["s"]}
        if impl.family:
            bound = floors[impl.family]
            record.update({**{f"floor_{k}": v for k, v in bound.items()},
                           "step_over_floor": _ratio(step["s"], bound["s"]),
                           "step_over_floor_min": _ratio(step["min_s"], bound["min_s"]),
                           "step_over_floor_cpu": _ratio(step["cpu_s"], bound["cpu_s"])})
            family_floor = floor_by_family[impl.family]
            if "floor_with_residual_s" in family_floor:
                record.update({
                    "floor_with_residual_s": family_floor["floor_with_residual_s"],
                    "floor_with_residual_cpu_s": family_floor["floor_with_residual_cpu_s"],
                    "step_over_floor_with_residual": _ratio(step["s"], family_floor["floor_with_residual_s"]),
                    "step_over_floor_with_residual_cpu": _ratio(step["cpu_s"], family_floor["floor_with_residual_cpu_s"])})
        if impl.name in refresh:
            refreshed = timings.stats(f"refresh:{impl.name}")
            gap = gaps[impl.family]
            record.update({**{f"refresh_step_{k}": v for k, v in refreshed.items()},
                           "refresh_extra_s": refreshed["s"] - step["s"], "gap": gap,
                           "amortized_step_s": step["s"] + (refreshed["s"] - step["s"]) / gap})
        records.append(record)
    add_ratios(records, ("step_s", "step_min_s", "step_cpu_s", "amortized_step_s", "state_bytes"))
    by_name = {r["method"]: r for r in records}
    for record in records:
        family = next((impl.family for impl in impls if impl.name == record["method"]), None)
        reference = by_name.get(f"{family}-ref")
        if family and reference is not None and record is not reference:
            for key in ("step_s", "step_min_s", "step_cpu_s", "refresh_step_s", "amortized_step_s"):
                record[f"ours_over_reference_{key[:-2]}"] = _ratio(record.get(key), reference.get(key))

    svd_rows = randomized_refresh_rows(tensors, rank, config, device)
    sizes = list(config.loro_sizes or (CUDA_LORO_SIZES if device.type == "cuda" else CPU_LORO_SIZES))
    loro_rows = loro_scaling(sizes, config.loro_rank, device, config.repeats, config.seed)
    tail = loro_rows[-3:] if len(loro_rows) >= 3 else loro_rows
    exact_slope = loglog_slope([r["d"] for r in tail], [r["exact_step_s"] for r in tail])
    dense_slope = loglog_slope([r["d"] for r in tail], [r["dense_svd_s"] for r in tail])

    meta = {
        "benchmark": "optimizer",
        "settings": {**dataclasses.asdict(config), "rank": rank, "n_matrices": len(shapes),
                     "elements": sum(a * b for a, b in shapes), "plain_tensors": len(tensors.plain_weights)},
        "missing_references": missing,
        "loro_exact_slope": exact_slope,
        "loro_dense_slope": dense_slope,
        "environment": environment(device),
        "load_average_1min_before": load_before,
        "load_average_1min_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "wall_s": time.perf_counter() - started,
        "notes": ["step_s / step_min_s: median / minimum over rounds of the median optimizer.step() wall time, "
                  "fixed gradients, projector not refreshed; step_cpu_s: the same in process CPU time (CPU only: "
                  "excludes waiting for a core on a busy machine); refresh_step_s: with an SVD refresh every step; "
                  "amortized_step_s at the method's gap",
                  "floor_s: torch AdamW(foreach) on the unprojected parameters and the projected-space "
                  "tensors + the projection / back-projection matmuls alone (table_floor)",
                  "ratios (_ratio) are to torch.optim.AdamW on the same weights (method 'full')",
                  "table_randomized_svd: torch.svd_lowrank refresh vs the exact SVD, time and subspace",
                  "loro slopes: log-log slope of seconds vs d over the three largest d (theory: 1 vs 3)"],
    }
    result = BenchResult("optimizer", records, meta,
                         tables={"floor": floor_rows, "randomized_svd": svd_rows, "loro_scaling": loro_rows})
    write_result(
        result, out_dir,
        RatioPlot(metrics=[("step_s_ratio", "steady step"), ("amortized_step_s_ratio", "step amortized @T")],
                  title=f"optimizer.step() vs torch AdamW ({config.preset} weights, rank {rank}, {device.type})",
                  ylabel="step time / torch AdamW step time"),
        extra_plot=lambda path: plot_scaling(path, loro_rows, config.loro_rank),
    )
    if show:
        print_report(config, rank, device, meta, records, floor_rows, svd_rows, loro_rows, missing)
    return result


def print_report(config, rank, device, meta, records, floor_rows, svd_rows, loro_rows, missing) -> None:
    threads = meta["environment"]["torch_threads"]
    cpu = records[0].get("step_cpu_s") is not None
    print_table(
        f"bench optimizer: {meta['settings']['n_matrices']} weights of preset {config.preset} "
        f"({meta['settings']['elements']:,} elements) + {meta['settings']['plain_tensors']} norms, rank {rank}, "
        f"{device}, {threads} thread(s); wall median | min of {config.repeats} rounds"
        + ("; CPU = process CPU time (median)" if cpu else "") + "; load "
        f"{format_value(meta['load_average_1min_before'])} -> {format_value(meta['load_average_1min_after'])}",
        records,
        [Column("method", "method", "text"), Column("step_s", "step", "seconds"),
         Column("step_min_s", "step min", "seconds")]
        + ([Column("step_cpu_s", "step CPU", "seconds")] if cpu else [])
        + [Column("floor_s", "floor", "seconds")]
        + ([Column("floor_cpu_s", "floor CPU", "seconds")] if cpu else [])
        + [Column("step_over_floor", "step/floor", "ratio"), Column("step_over_floor_min", "min/min", "ratio")]
        + ([Column("step_over_floor_cpu", "CPU/CPU", "ratio")] if cpu else [])
        + [Column("step_over_floor_with_residual", "/(floor+res.)", "ratio")]
        + ([Column("step_over_floor_with_residual_cpu", "CPU/(floor+res.)", "ratio")] if cpu else [])
        + [Column("step_s_ratio", "/AdamW", "ratio")]
        + ([Column("step_cpu_s_ratio", "CPU /AdamW", "ratio")] if cpu else [])
        + [Column("ours_over_reference_step", "ours/ref", "ratio"), Column("ours_over_reference_step_min", "min/min", "ratio")]
        + ([Column("ours_over_reference_step_cpu", "CPU/CPU", "ratio")] if cpu else [])
        + [Column("refresh_step_s", "refresh", "seconds"), Column("amortized_step_s", "step @T", "seconds"),
           Column("state_bytes", "state", "bytes")],
    )
    print_table(
        "floor of a projected step: torch AdamW(foreach) on the Adam-updated tensors + the matmuls alone",
        floor_rows,
        [Column("family", "method", "text"), Column("adam_s", "AdamW", "seconds"),
         Column("back_projections", "back-proj.", "count"), Column("matmul_per_matrix_s", "matmuls", "seconds"),
         Column("matmul_batched_s", "matmuls batched", "seconds"), Column("floor_s", "floor", "seconds"),
         Column("floor_min_s", "floor min", "seconds"), Column("floor_cpu_s", "floor CPU", "seconds"),
         Column("residual_s", "Fira residual passes", "seconds"), Column("floor_with_residual_s", "floor + residual", "seconds"),
         Column("floor_with_residual_cpu_s", "floor + residual CPU", "seconds")],
    )
    print_table(
        f"projector refresh: exact SVD vs torch.svd_lowrank (q = r + {config.svd_oversample}, "
        f"niter {config.svd_niter}), one matrix",
        svd_rows,
        [Column("shape", "shape", "text"), Column("side", "side", "text"), Column("matrices", "n", "count"),
         Column("exact_svd_s", "exact", "seconds"), Column("randomized_svd_s", "randomized", "seconds"),
         Column("exact_over_randomized", "speedup", "ratio"),
         Column("subspace_distance_max", "subspace dist. max", "number"),
         Column("energy_kept_min", "energy kept min", "percent")],
    )
    exact_slope, dense_slope = meta["loro_exact_slope"], meta["loro_dense_slope"]
    print_table(
        f"bench optimizer: LORO exact step vs dense SVD retraction (rank {config.loro_rank}); "
        f"log-log slopes exact {exact_slope if exact_slope is None else round(exact_slope, 2)}, "
        f"dense {dense_slope if dense_slope is None else round(dense_slope, 2)}",
        loro_rows,
        [Column("d", "d", "count"), Column("rank", "r", "count"), Column("exact_step_s", "exact step", "seconds"),
         Column("dense_svd_s", "dense SVD", "seconds"), Column("dense_over_exact", "dense/exact", "ratio"),
         Column("relative_difference", "rel. diff", "number")],
    )
    for line in missing:
        print(f"note: {line}")
