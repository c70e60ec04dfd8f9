"""`rankscope bench optimizer`: our projected optimizers against the reference packages, and
the LORO exact step against a dense SVD retraction as the matrix grows.

Part 1. The weights are the targeted projections of the preset's model (every q, k, v, o, gate,
up, down of every block, shapes from the config), the rank is the one the methods use for the
preset, and every implementation steps on identical parameters with identical gradients:
- full: `torch.optim.AdamW` (the dense baseline, ratio 1.0);
- galore / galore-ref: `rankscope.optim.GaLoreAdamW` / `galore_torch.GaLoreAdamW`;
- fira / fira-ref: `rankscope.optim.FiraAdamW` / `fira.FiraAdamW`.
Steady steps use a projector gap longer than the run (the projector is computed once, during
warm-up); refresh steps use gap 1 (an SVD every step); the refresh's extra cost is amortized at
the methods' own gap T (200 in GaLore / Fira).

Part 2. For W = B·A (d x d, rank r fixed) the exact Riemannian step `loro.exact_step` works on
QR factors and a 2r x 2r SVD, O(r²·d); the dense formula SVD_r(W − η·P_T(G)) needs a full SVD,
O(d³). Both are timed for growing d and their log-log slopes fitted.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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
    timed,
    write_result,
)
from rankscope.errors import ConfigError

log = logging.getLogger("rankscope.bench")

CPU_LORO_SIZES = (64, 128, 256, 512, 1024)
CUDA_LORO_SIZES = (256, 512, 1024, 2048, 4096, 8192)
NEVER = 10**9  # a projector gap longer than any benchmark run


@dataclass
class OptimizerBenchConfig:
    preset: str = "tiny"
    device: str = "cpu"
    steps: int = 5  # timed steps per sample
    warmup: int = 2
    repeats: int = 3
    rank: int | None = None  # default: the methods' rank for the preset
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    loro_sizes: list[int] | None = None
    loro_rank: int = 32
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# implementations


def _reference(module: str, attr: str) -> Callable | None:
    """A reference package's optimizer class, or None when the package is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # galore_torch imports bitsandbytes, which warns on CPU
            return getattr(importlib.import_module(module), attr)
    except ImportError:
        return None


@dataclass
class Implementation:
    name: str
    description: str
    build: Callable[[list[torch.nn.Parameter], int], torch.optim.Optimizer]  # (params, proj gap) -> optimizer
    projected: bool


def implementations(rank: int, scale: float, alpha: float) -> tuple[list[Implementation], list[str]]:
    from rankscope.optim import FiraAdamW, GaLoreAdamW

    lr, eps = 1e-3, 1e-6

    def projected_group(params, gap, extra):
        return [{"params": params, "rank": rank, "update_proj_gap": gap, "proj_type": "std", **extra}]

    found = [
        Implementation("full", "torch.optim.AdamW", lambda ps, gap: torch.optim.AdamW(ps, lr=lr, eps=eps), False),
        Implementation("galore", "rankscope.optim.GaLoreAdamW",
                       lambda ps, gap: GaLoreAdamW(projected_group(ps, gap, {"scale": scale}), lr=lr, eps=eps), True),
    ]
    missing = []
    galore_ref = _reference("galore_torch", "GaLoreAdamW")
    if galore_ref is not None:
        found.append(Implementation(
            "galore-ref", "galore_torch.GaLoreAdamW (galore-torch)",
            lambda ps, gap: galore_ref(projected_group(ps, gap, {"scale": scale}), lr=lr, eps=eps,
                                       no_deprecation_warning=True), True))
    else:
        missing.append("galore-torch is not installed: pip install galore-torch")
    found.append(Implementation("fira", "rankscope.optim.FiraAdamW",
                                lambda ps, gap: FiraAdamW(projected_group(ps, gap, {"alpha": alpha}), lr=lr, eps=eps), True))
    fira_ref = _reference("fira", "FiraAdamW")
    if fira_ref is not None:
        found.append(Implementation(
            "fira-ref", "fira.FiraAdamW (fira)",
            lambda ps, gap: fira_ref(projected_group(ps, gap, {"alpha": alpha}), lr=lr, eps=eps,
                                     no_deprecation_warning=True), True))
    else:
        missing.append("fira is not installed: pip install fira")
    return found, missing


def target_shapes(model_config) -> list[tuple[int, int]]:
    """(d_out, d_in) of every targeted projection of the model, in model order."""
    hidden, ffn = model_config.hidden_size, model_config.intermediate_size
    per_block = [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn)]
    return per_block * model_config.num_layers


class OptimizerRun:
    """One implementation stepping on its own copy of the weights with shared gradients."""

    def __init__(self, impl: Implementation, weights: list[torch.Tensor], grads: list[torch.Tensor], gap: int):
        self.params = [torch.nn.Parameter(w.clone()) for w in weights]
        self.grads = grads
        self.optimizer = impl.build(self.params, gap)

    def step(self, device: torch.device) -> float:
        for p, g in zip(self.params, self.grads):
            p.grad = g.clone()  # fresh each step: no implementation sees another's in-place edits
        seconds, _ = timed(self.optimizer.step, device)
        return seconds


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
            elif hasattr(value, "ortho_matrix") and torch.is_tensor(getattr(value, "ortho_matrix", None)):
                total += value.ortho_matrix.numel() * value.ortho_matrix.element_size()  # reference projectors
    return total


# ---------------------------------------------------------------------------------------------
# LORO exact step vs dense retraction


def dense_svd_retraction(B: torch.Tensor, A: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """SVD_r(W − lr·P_T(G)) with W = B·A, computed densely (the O(d³) reference formula)."""
    rank = B.shape[1]
    weight = B @ A
    u, _ = torch.linalg.qr(B)
    v, _ = torch.linalg.qr(A.mT)
    left = u @ (u.mT @ grad)
    tangent = left + (grad @ v) @ v.mT - (left @ v) @ v.mT
    uu, ss, vh = torch.linalg.svd(weight - lr * tangent, full_matrices=False)
    return (uu[:, :rank] * ss[:rank]) @ vh[:rank]


def loro_scaling(sizes: list[int], rank: int, device: torch.device, repeats: int, seed: int) -> list[dict[str, Any]]:
    from rankscope.optim import exact_step

    rows = []
    lr = 1e-2
    for d in sizes:
        r = min(rank, d // 2)
        generator = torch.Generator().manual_seed(seed + d)
        B = (torch.randn(d, r, generator=generator) / math.sqrt(d)).to(device)
        A = (torch.randn(r, d, generator=generator) / math.sqrt(d)).to(device)
        G = (torch.randn(d, d, generator=generator) / d).to(device)
        grad_B, grad_A = G @ A.mT, B.mT @ G

        calls = {"exact": lambda: exact_step(B, A, grad_B, grad_A, lr),
                 "dense": lambda: dense_svd_retraction(B, A, G, lr)}
        for fn in calls.values():
            fn()  # warm-up (allocations, kernels, lazy LAPACK init)
        samples = run_alternating(list(calls), repeats, lambda name, _: timed(calls[name], device)[0])
        new_B, new_A = exact_step(B, A, grad_B, grad_A, lr)
        dense = dense_svd_retraction(B, A, G, lr)
        agreement = float(torch.linalg.matrix_norm(new_B @ new_A - dense) / torch.linalg.matrix_norm(dense))
        exact_s, dense_s = median(samples["exact"]), median(samples["dense"])
        rows.append({"d": d, "rank": r, "exact_step_s": exact_s, "dense_svd_s": dense_s,
                     "dense_over_exact": dense_s / exact_s, "relative_difference": agreement})
        log.info("bench optimizer: LORO d=%d done", d)
    return rows


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log x (the empirical exponent of the scaling)."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(points) < 2:
        return None
    mean_x = sum(p[0] for p in points) / len(points)
    mean_y = sum(p[1] for p in points) / len(points)
    var = sum((p[0] - mean_x) ** 2 for p in points)
    return sum((p[0] - mean_x) * (p[1] - mean_y) for p in points) / var if var else None


def plot_scaling(path: Path, rows: list[dict[str, Any]], rank: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = [r["d"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.loglog(d, [r["exact_step_s"] for r in rows], "o-", label="LORO exact step (QR + 2r x 2r SVD)")
    ax.loglog(d, [r["dense_svd_s"] for r in rows], "s-", label="dense SVD retraction")
    ax.set_xlabel(f"d (weight d x d, rank r = {rank})")
    ax.set_ylabel("seconds per step (log scale)")
    ax.set_title("LORO exact step vs dense SVD retraction")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the benchmark


def run_optimizer_bench(config: OptimizerBenchConfig, out_dir=None, show: bool = True) -> BenchResult:
    from rankscope import methods
    from rankscope.models import get_preset

    for key in ("steps", "repeats", "loro_rank"):
        if getattr(config, key) < 1:
            raise ConfigError(f"bench optimizer: {key} must be at least 1, got {getattr(config, key)}")
    device = resolve_bench_device(config.device)
    started = time.perf_counter()
    model_config = dataclasses.replace(get_preset(config.preset), **config.model_overrides)
    galore_defaults = methods.get("galore").default_settings(config.preset, model_config)
    fira_defaults = methods.get("fira").default_settings(config.preset, model_config)
    rank = config.rank or galore_defaults.rank
    shapes = target_shapes(model_config)
    if rank >= min(min(s) for s in shapes):
        raise ConfigError(f"bench optimizer: rank {rank} must be below the smallest weight side {min(min(s) for s in shapes)}")

    generator = torch.Generator().manual_seed(config.seed)
    weights = [(0.02 * torch.randn(*shape, generator=generator)).to(device) for shape in shapes]
    grads = [(1e-3 * torch.randn(*shape, generator=generator)).to(device) for shape in shapes]
    impls, missing = implementations(rank, galore_defaults.scale, fira_defaults.alpha)
    by_name = {impl.name: impl for impl in impls}

    steady = {impl.name: OptimizerRun(impl, weights, grads, NEVER) for impl in impls}
    refresh = {impl.name: OptimizerRun(impl, weights, grads, 1) for impl in impls if impl.projected}
    for run in list(steady.values()) + list(refresh.values()):
        for _ in range(config.warmup):
            run.step(device)

    def measure(key: str, _repeat: int) -> float:
        kind, name = key.split(":", 1)
        run = steady[name] if kind == "steady" else refresh[name]
        return median(run.step(device) for _ in range(config.steps))

    keys = [f"steady:{n}" for n in steady] + [f"refresh:{n}" for n in refresh]
    samples = run_alternating(keys, config.repeats, measure)

    records = []
    for impl in impls:
        step_s = median(samples[f"steady:{impl.name}"])
        record: dict[str, Any] = {"method": impl.name, "implementation": impl.description, "step_s": step_s,
                                  "state_bytes": state_bytes(steady[impl.name].optimizer)}
        if impl.projected:
            gap = galore_defaults.update_proj_gap if impl.name.startswith("galore") else fira_defaults.update_proj_gap
            refresh_s = median(samples[f"refresh:{impl.name}"])
            record.update({"refresh_step_s": refresh_s, "refresh_extra_s": refresh_s - step_s, "gap": gap,
                           "amortized_step_s": step_s + (refresh_s - step_s) / gap})
        else:
            record.update({"refresh_step_s": None, "refresh_extra_s": None, "gap": None, "amortized_step_s": step_s})
        records.append(record)
    add_ratios(records, ("step_s", "amortized_step_s", "state_bytes"))
    for record in records:
        reference = by_name.get(f"{record['method']}-ref")
        if reference is not None:
            ref = next(r for r in records if r["method"] == reference.name)
            record["ours_over_reference_step"] = record["step_s"] / ref["step_s"]
            record["ours_over_reference_refresh"] = record["refresh_step_s"] / ref["refresh_step_s"]
            record["ours_over_reference_amortized"] = record["amortized_step_s"] / ref["amortized_step_s"]

    sizes = list(config.loro_sizes or (CUDA_LORO_SIZES if device.type == "cuda" else CPU_LORO_SIZES))
    loro_rows = loro_scaling(sizes, config.loro_rank, device, config.repeats, config.seed)
    tail = loro_rows[-3:] if len(loro_rows) >= 3 else loro_rows
    exact_slope = loglog_slope([r["d"] for r in tail], [r["exact_step_s"] for r in tail])
    dense_slope = loglog_slope([r["d"] for r in tail], [r["dense_svd_s"] for r in tail])

    meta = {
        "benchmark": "optimizer",
        "settings": {**dataclasses.asdict(config), "rank": rank, "n_matrices": len(shapes),
                     "elements": sum(a * b for a, b in shapes)},
        "missing_references": missing,
        "loro_exact_slope": exact_slope,
        "loro_dense_slope": dense_slope,
        "environment": environment(device),
        "wall_s": time.perf_counter() - started,
        "notes": ["step_s: median optimizer.step() time with fixed gradients, projector not refreshed; "
                  "refresh_step_s: with an SVD refresh every step; amortized_step_s at the method's gap",
                  "ratios are to torch.optim.AdamW on the same weights (method 'full')",
                  "loro slopes: log-log slope of seconds vs d over the three largest d (theory: 1 vs 3)"],
    }
    result = BenchResult("optimizer", records, meta, tables={"loro_scaling": loro_rows})
    write_result(
        result, out_dir,
        RatioPlot(metrics=[("step_s_ratio", "steady step"), ("amortized_step_s_ratio", "step amortized @T")],
                  title=f"optimizer.step() vs torch AdamW ({config.preset} weights, rank {rank}, {device.type})",
                  ylabel="step time / torch AdamW step time"),
        extra_plot=lambda path: plot_scaling(path, loro_rows, config.loro_rank),
    )
    if show:
        print_table(
            f"bench optimizer: {len(shapes)} weights of preset {config.preset} "
            f"({meta['settings']['elements']:,} elements), rank {rank}, {device}",
            records,
            [Column("method", "method", "text"), Column("implementation", "implementation", "text"),
             Column("step_s", "step", "seconds"), Column("step_s_ratio", "step/AdamW", "ratio"),
             Column("refresh_step_s", "refresh step", "seconds"), Column("gap", "T", "count"),
             Column("amortized_step_s", "step @T", "seconds"),
             Column("ours_over_reference_step", "ours/ref step", "ratio"),
             Column("ours_over_reference_refresh", "ours/ref refresh", "ratio"),
             Column("state_bytes", "state", "bytes")],
        )
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
    return result
