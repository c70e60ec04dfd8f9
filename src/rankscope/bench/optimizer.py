"""`rankscope bench optimizer`: GaLore / Fira steps next to their floor, torch AdamW and the
reference packages; the randomized projector refresh against the exact SVD; LORO's exact step
against a dense SVD retraction (`loro_step.py`).

Part 1, the steps. The weights are the preset's targeted projections (q, k, v, o, gate, up, down
of every block) plus the blocks' RMSNorm weights (what GaLore / Fira leave unprojected and step
with plain AdamW); the rank is the methods' rank for the preset. The gradients are identical for
every implementation and have a decaying spectrum (singular values ∝ 1/i, RMS 1e-3), as LLM
gradients do; it matters for the refresh quality below, not for the cost of a step.
- full: `torch.optim.AdamW(foreach=True)` on every tensor (the dense baseline);
- galore / fira: ours, stacking same-shaped matrices as the optimizer chooses for the device;
  galore-stacked / galore-per-matrix (and fira-...): the other choice, for comparison;
  galore-rsvd: ours with the randomized refresh (`svd="randomized"`);
  golore: GoLoreAdamW in its random phase (a Haar draw instead of the gradient's SVD at a refresh);
- spam / stable-spam: the dense SPAM and Stable-SPAM optimizers on the same tensors (no floor);
- galore-ref / fira-ref: `galore_torch.GaLoreAdamW` / `fira.FiraAdamW`.
Steady steps use a projector gap longer than the run; refresh steps use gap 1 (an SVD every
step); the refresh's extra cost is amortized at the method's gap T (200 in GaLore / Fira).

The floor of a projected step is the arithmetic it cannot avoid, each part timed alone on the
same shapes:
- adam: `torch.optim.AdamW(foreach=True)` on the tensors Adam updates: the unprojected
  parameters and one tensor of each projected gradient's low-rank shape (m x r or r x n);
- matmul: the projection of every gradient (G·Pᵀ or Pᵀ·G, into a preallocated output) and its
  back-projection accumulated into the weight (W += N·P, one GEMM with accumulation); GaLore
  back-projects once, Fira twice (its residual needs back(R) as well as the update back(N)).
  On CUDA each is timed per matrix and as one batched matmul per shape, and the faster counts.
floor = adam + matmul; step / floor is the cost of everything else (elementwise passes over
full-size tensors, allocation, Python). Fira also has full-size elementwise work no
implementation avoids: forming its residual S = G·phi, taking ||S|| for the limiter and adding S
to the weight, three passes over every matrix; they are timed alone too ("residual"), and Fira's
step is also given over floor + residual.

Part 2, the randomized refresh. For each distinct (shape, side): the exact SVD (the reference's
refresh) and `torch.svd_lowrank` with r + oversample columns and niter subspace iterations,
timed, and the subspaces they give compared over every matrix of that shape: the distance
||P Pᵀ − Q Qᵀ||_F / sqrt(2r) (0: the same subspace, 1: orthogonal) and the gradient energy the
randomized projector keeps relative to the exact one (1: as much).

Every timing is the median of `steps` consecutive calls; the implementations take turns
(`run_alternating`) for `repeats` rounds; records give the median and the minimum over rounds
of the wall time and, on the CPU, the median of the process CPU time. On a busy shared machine
the wall time includes waiting for a core; the CPU time (with one thread) does not, and is the
steadier estimate of the cost itself.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

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
    timed,
    write_result,
)
from rankscope.bench.loro_step import CPU_LORO_SIZES, CUDA_LORO_SIZES, loglog_slope, loro_scaling, plot_scaling
from rankscope.errors import ConfigError

log = logging.getLogger("rankscope.bench")

NEVER = 10**9  # a projector gap longer than any benchmark run
GRAD_RMS = 1e-3
LR, EPS = 1e-3, 1e-6


@dataclass
class OptimizerBenchConfig:
    preset: str = "tiny"
    device: str = "cpu"
    steps: int = 5  # timed steps per sample
    warmup: int = 2
    repeats: int = 3
    refresh_steps: int = 2  # timed refresh steps per sample (each is an SVD of every matrix)
    rank: int | None = None  # default: the methods' rank for the preset
    svd_oversample: int = 8
    svd_niter: int = 2
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    loro_sizes: list[int] | None = None
    loro_rank: int = 32
    seed: int = 0

    def validate(self) -> None:
        for key in ("steps", "repeats", "refresh_steps", "loro_rank"):
            if getattr(self, key) < 1:
                raise ConfigError(f"bench optimizer: {key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        for key in ("warmup", "svd_oversample", "svd_niter"):
            if getattr(self, key) < 0:
                raise ConfigError(f"bench optimizer: {key.replace('_', '-')} must be >= 0, got {getattr(self, key)}")


# ---------------------------------------------------------------------------------------------
# the tensors


@dataclass
class BenchTensors:
    shapes: list[tuple[int, int]]        # projected weights, model order
    weights: list[torch.Tensor]
    grads: list[torch.Tensor]
    plain_weights: list[torch.Tensor]    # RMSNorm weights: stepped by plain AdamW
    plain_grads: list[torch.Tensor]


def target_shapes(model_config) -> list[tuple[int, int]]:
    """(d_out, d_in) of every targeted projection of the model, in model order."""
    hidden, ffn = model_config.hidden_size, model_config.intermediate_size
    per_block = [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn)]
    return per_block * model_config.num_layers


def decaying_spectrum(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """U diag(1/i) Vᵀ with random orthonormal U, V, scaled to RMS `GRAD_RMS`."""
    k = min(rows, cols)
    u = torch.linalg.qr(torch.randn(rows, k, generator=generator))[0]
    v = torch.linalg.qr(torch.randn(cols, k, generator=generator))[0]
    matrix = (u / torch.arange(1, k + 1, dtype=torch.float32)) @ v.T
    return matrix * (GRAD_RMS / matrix.square().mean().sqrt())


def bench_tensors(model_config, seed: int, device: torch.device) -> BenchTensors:
    """Weights at the init scale and gradients with a 1/i spectrum.

    One base gradient per shape (QR is the slow part); each matrix gets it with its rows permuted
    and its columns' signs flipped at random, which keeps the spectrum and changes the singular
    vectors.
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = target_shapes(model_config)
    bases = {shape: decaying_spectrum(*shape, generator) for shape in dict.fromkeys(shapes)}
    weights, grads = [], []
    for rows, cols in shapes:
        weights.append((0.02 * torch.randn(rows, cols, generator=generator)).to(device))
        rows_order = torch.randperm(rows, generator=generator)
        signs = torch.randint(0, 2, (cols,), generator=generator).float() * 2 - 1
        grads.append((bases[(rows, cols)][rows_order] * signs).to(device))
    hidden = model_config.hidden_size
    n_norms = 2 * model_config.num_layers
    plain_weights = [torch.ones(hidden, device=device) for _ in range(n_norms)]
    plain_grads = [(GRAD_RMS * torch.randn(hidden, generator=generator)).to(device) for _ in range(n_norms)]
    return BenchTensors(shapes, weights, grads, plain_weights, plain_grads)


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
    family: str | None  # "galore" / "fira": a projected step with that floor; None: AdamW
    build: Callable[[list[torch.Tensor], list[torch.Tensor], int], torch.optim.Optimizer]  # (projected, plain, gap)
    refresh: bool = True  # also time steps that refresh the projector


def implementations(rank: int, scale: float, alpha: float, device: torch.device,
                    oversample: int, niter: int) -> tuple[list[Implementation], list[str]]:
    from rankscope.optim import SPAM, APOLLOAdamW, FiraAdamW, GaLoreAdamW, GoLoreAdamW, StableSPAM

    def groups(projected, plain, gap, extra):
        return [{"params": projected, "rank": rank, "update_proj_gap": gap, "proj_type": "std", **extra},
                {"params": plain}]

    def mini_groups(projected, plain, gap):
        return [{"params": projected, "rank": 1, "update_proj_gap": gap, "proj_type": "std", "scale": 128.0,
                 "proj": "random", "scale_type": "tensor"}, {"params": plain}]

    galore_keys, fira_keys = {"scale": scale}, {"alpha": alpha}
    apollo_keys = {"scale": 1.0, "proj": "random", "scale_type": "channel"}
    randomized = {"svd": "randomized", "svd_oversample": oversample, "svd_niter": niter}
    default_mode = "stacked" if device.type == "cuda" else "per-matrix"
    other_mode = "per-matrix" if device.type == "cuda" else "stacked"
    found = [Implementation("full", "torch.optim.AdamW(foreach=True)", None,
                            lambda pr, pl, gap: torch.optim.AdamW(pr + pl, lr=LR, eps=EPS, foreach=True), False),
             # The dense optimizers of the benchmark: full-size Adam state, no projection (no floor).
             Implementation("spam", "rankscope SPAM (momentum resets, spike clipping)", None,
                            lambda pr, pl, gap: SPAM([{"params": pl}, {"params": pr, "density": 1.0}], lr=LR, eps=EPS),
                            False),
             Implementation("stable-spam", "rankscope StableSPAM (adaptive clipping, norm scaling)", None,
                            lambda pr, pl, gap: StableSPAM(pl + pr, lr=LR, eps=EPS, total_steps=10**6), False)]
    missing = []
    for family, cls, keys, module, attr, package in (
        ("galore", GaLoreAdamW, galore_keys, "galore_torch", "GaLoreAdamW", "galore-torch"),
        ("fira", FiraAdamW, fira_keys, "fira", "FiraAdamW", "fira"),
        ("apollo", APOLLOAdamW, apollo_keys, "apollo_torch", "APOLLOAdamW", "apollo-torch"),
    ):
        found.append(Implementation(
            family, f"rankscope {cls.__name__} ({default_mode})", family,
            lambda pr, pl, gap, cls=cls, keys=keys: cls(groups(pr, pl, gap, keys), lr=LR, eps=EPS)))
        found.append(Implementation(
            f"{family}-{other_mode}", f"rankscope {cls.__name__} ({other_mode})", family,
            lambda pr, pl, gap, cls=cls, keys=keys: cls(groups(pr, pl, gap, keys), lr=LR, eps=EPS,
                                                        batched=other_mode == "stacked"), refresh=False))
        if family == "galore":
            found.append(Implementation(
                "galore-rsvd", f"rankscope GaLoreAdamW, svd_lowrank refresh (q = r + {oversample}, niter {niter})",
                family, lambda pr, pl, gap: GaLoreAdamW(groups(pr, pl, gap, {**galore_keys, **randomized}),
                                                        lr=LR, eps=EPS)))
            # GoLore's random phase: GaLore's step, a Haar draw instead of the gradient's SVD at a refresh.
            found.append(Implementation(
                "golore", f"rankscope GoLoreAdamW, random projectors ({default_mode})", family,
                lambda pr, pl, gap: GoLoreAdamW(groups(pr, pl, gap, {"scale": 1.0, "random_from_step": 0}),
                                                lr=LR, eps=EPS)))
        if family == "apollo":  # APOLLO-Mini: rank 1, one factor per tensor (no floor of its own rank)
            found.append(Implementation(
                "apollo-mini", "rankscope APOLLOAdamW, rank 1, tensor scaling (APOLLO-Mini)", None,
                lambda pr, pl, gap: APOLLOAdamW(mini_groups(pr, pl, gap), lr=LR, eps=EPS, scale_front=True)))
        reference = _reference(module, attr)
        if reference is None:
            missing.append(f"{package} is not installed: pip install {package}")
            continue
        found.append(Implementation(
            f"{family}-ref", f"{module}.{attr} ({package})", family,
            lambda pr, pl, gap, reference=reference, keys=keys: reference(
                groups(pr, pl, gap, keys), lr=LR, eps=EPS, no_deprecation_warning=True)))
    return found, missing


class OptimizerRun:
    """One implementation stepping on its own copy of the weights with the shared gradients."""

    def __init__(self, impl: Implementation, tensors: BenchTensors, gap: int):
        self.projected = [torch.nn.Parameter(w.clone()) for w in tensors.weights]
        self.plain = [torch.nn.Parameter(w.clone()) for w in tensors.plain_weights]
        self.grads = tensors.grads + tensors.plain_grads
        self.optimizer = impl.build(self.projected, self.plain, gap)

    def step(self, device: torch.device) -> tuple[float, float | None]:
        for p, g in zip(self.projected + self.plain, self.grads):
            p.grad = g.clone()  # fresh each step (untimed): no implementation sees another's edits
        return wall_and_cpu(self.optimizer.step, device)


def wall_and_cpu(fn: Callable[[], Any], device: torch.device) -> tuple[float, float | None]:
    """(wall seconds, process CPU seconds) of one call; CPU seconds only on the CPU device.

    On a shared CPU the wall time includes the time the process waits for a core; its CPU time
    does not (with one thread it is the wall time an idle machine would show), so both are kept.
    """
    cpu_start = time.process_time()
    wall, _ = timed(fn, device)
    return wall, (time.process_time() - cpu_start) if device.type == "cpu" else None


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


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
            else:  # the reference packages keep their projector matrices in a Python object
                matrix = getattr(value, "ortho_matrix", None)
                for tensor in matrix if isinstance(matrix, list) else [matrix]:
                    if torch.is_tensor(tensor):
                        total += tensor.numel() * tensor.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# the floor


class Floor:
    """The unavoidable parts of a projected step, each callable on its own (see the module doc)."""

    def __init__(self, tensors: BenchTensors, rank: int, device: torch.device):
        from rankscope.optim.projector import projection_side

        generator = torch.Generator().manual_seed(1)
        self.sides = [projection_side(shape, "std") for shape in tensors.shapes]
        self.weights = [w.clone() for w in tensors.weights]
        self.grads = tensors.grads
        self.projectors, self.lows = [], []
        for (rows, cols), side in zip(tensors.shapes, self.sides):
            if side == "right":
                basis = torch.linalg.qr(torch.randn(cols, rank, generator=generator))[0].T.contiguous()
                self.lows.append(torch.empty(rows, rank, device=device))
            else:
                basis = torch.linalg.qr(torch.randn(rows, rank, generator=generator))[0]
                self.lows.append(torch.empty(rank, cols, device=device))
            self.projectors.append(basis.to(device))
        adam_params = [torch.nn.Parameter(torch.zeros_like(low)) for low in self.lows]
        adam_params += [torch.nn.Parameter(w.clone()) for w in tensors.plain_weights]
        for p, g in zip(adam_params, [GRAD_RMS * torch.randn_like(low) for low in self.lows] + tensors.plain_grads):
            p.grad = g
        self.adam = torch.optim.AdamW(adam_params, lr=LR, eps=EPS, foreach=True)
        self.stacks = self._stacks() if device.type == "cuda" else []
        # Fira's residual S = G·phi (phi per row for a right projection, per column for a left one).
        self.residuals = [torch.empty_like(w) for w in self.weights]
        self.phis = [torch.rand(w.shape[0], 1, generator=generator).to(device) if side == "right"
                     else torch.rand(1, w.shape[1], generator=generator).to(device)
                     for w, side in zip(self.weights, self.sides)]

    def _stacks(self) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(side, G, P, W, low) stacked per distinct shape and side, for the batched form."""
        by_key: dict[tuple, list[int]] = {}
        for index, (weight, side) in enumerate(zip(self.weights, self.sides)):
            by_key.setdefault((tuple(weight.shape), side), []).append(index)
        return [(side, torch.stack([self.grads[i] for i in ids]), torch.stack([self.projectors[i] for i in ids]),
                 torch.stack([self.weights[i] for i in ids]), torch.stack([self.lows[i] for i in ids]))
                for (_, side), ids in by_key.items()]

    def adam_step(self) -> None:
        self.adam.step()

    def matmuls(self, back_projections: int) -> None:
        for grad, weight, projector, low, side in zip(self.grads, self.weights, self.projectors, self.lows, self.sides):
            project_and_back(grad, weight, projector, low, side, back_projections)

    def residual_passes(self) -> None:
        """Fira's full-size elementwise work alone: form S = G·phi, take ||S||, add S to W."""
        for grad, weight, residual, phi in zip(self.grads, self.weights, self.residuals, self.phis):
            torch.mul(grad, phi, out=residual)
            torch.linalg.vector_norm(residual)
            weight.add_(residual, alpha=-LR)

    def batched_matmuls(self, back_projections: int) -> None:
        for side, grads, projectors, weights, lows in self.stacks:
            project_and_back(grads, weights, projectors, lows, side, back_projections)


def project_and_back(grad: torch.Tensor, weight: torch.Tensor, projector: torch.Tensor, low: torch.Tensor,
                     side: str, back_projections: int) -> None:
    """low = projection of grad; weight += back(low), `back_projections` times (matrices or stacks)."""
    matmul = torch.mm if grad.dim() == 2 else torch.bmm
    accumulate = weight.addmm_ if grad.dim() == 2 else weight.baddbmm_
    if side == "right":
        matmul(grad, projector.mT, out=low)
        for _ in range(back_projections):
            accumulate(low, projector, alpha=-LR)
    else:
        matmul(projector.mT, grad, out=low)
        for _ in range(back_projections):
            accumulate(projector, low, alpha=-LR)


# APOLLO projects but never projects back: its update is the raw gradient, scaled.
BACK_PROJECTIONS = {"galore": 1, "fira": 2, "apollo": 0}
# Families with full-size elementwise passes no implementation avoids (scaling G, its norm, the add).
RESIDUAL_FAMILIES = ("fira", "apollo")


# ---------------------------------------------------------------------------------------------
# the randomized refresh


def randomized_refresh_rows(tensors: BenchTensors, rank: int, config: OptimizerBenchConfig,
                            device: torch.device) -> list[dict[str, Any]]:
    from rankscope.optim.projector import compute_projection, projection_side

    rows = []
    for shape in dict.fromkeys(tensors.shapes):
        side = projection_side(shape, "std")
        key = "proj_right" if side == "right" else "proj_left"
        grads = [g for s, g in zip(tensors.shapes, tensors.grads) if s == shape]

        def exact(grad):
            return compute_projection(grad, rank, side)[key]

        def randomized(grad):
            return compute_projection(grad, rank, side, svd="randomized", oversample=config.svd_oversample,
                                      niter=config.svd_niter, seed=config.seed)[key]

        calls = {"exact": lambda: exact(grads[0]), "randomized": lambda: randomized(grads[0])}
        for fn in calls.values():
            fn()  # warm-up (LAPACK / cuSOLVER initialisation)
        samples = run_alternating(list(calls), config.repeats, lambda name, _: timed(calls[name], device)[0])
        distances, energies = [], []
        for grad in grads:
            p, q = exact(grad), randomized(grad)
            if side == "right":
                p, q, kept_p, kept_q = p.T, q.T, grad @ p.T, grad @ q.T
            else:
                kept_p, kept_q = p.T @ grad, q.T @ grad
            distances.append(float(torch.linalg.matrix_norm(p @ p.T - q @ q.T) / (2 * rank) ** 0.5))
            energies.append(float(kept_q.square().sum() / kept_p.square().sum()))
        exact_s, randomized_s = median(samples["exact"]), median(samples["randomized"])
        rows.append({"shape": f"{shape[0]}x{shape[1]}", "side": side, "matrices": len(grads), "rank": rank,
                     "oversample": config.svd_oversample, "niter": config.svd_niter,
                     "exact_svd_s": exact_s, "exact_svd_min_s": min(samples["exact"]),
                     "randomized_svd_s": randomized_s, "randomized_svd_min_s": min(samples["randomized"]),
                     "exact_over_randomized": exact_s / randomized_s,
                     "subspace_distance_max": max(distances), "subspace_distance_median": median(distances),
                     "energy_kept_min": min(energies), "energy_kept_median": median(energies)})
        log.info("bench optimizer: randomized refresh %dx%d done", *shape)
    return rows


# ---------------------------------------------------------------------------------------------
# the benchmark


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
