"""`AnalysisSettings`: every knob of `rankscope analyze`, validated before any heavy work.

Defaults follow the study's code wherever it defines a metric (docs/metrics.md names the file
for each); our own definitions are named options next to them. The settings that decide a
family's numbers are hashed into the key of every finished item (see
:meth:`AnalysisSettings.family_settings`), so a re-run with the same settings skips finished
work and a re-run with other settings recomputes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from rankscope.analysis.interpolation import DEFAULT_INTERPOLATION_POINTS
from rankscope.analysis.landscape import (
    BEYOND_RANK_RULES,
    DEFAULT_GRID_POINTS,
    DEFAULT_RANDOM_RADIUS,
    DEFAULT_SINGULAR_RADIUS,
    STUDY_SINGULAR_GRID,
)
from rankscope.analysis.spectral import DEFAULT_RANK_TOL, DEFAULT_THRESHOLD
from rankscope.errors import AnalysisError, did_you_mean

FAMILIES: tuple[str, ...] = ("landscape", "interpolation", "spectral", "similarity", "intruder", "landscape2d", "hessian")
SCOPES: tuple[str, ...] = ("all", "blocks")
SPACES: tuple[str, ...] = ("native", "dense")
# Each choice: the study's value first (the default), then ours.
CHOICES: dict[str, tuple[str, ...]] = {
    "loss_average": ("batch_mean", "token"),
    "singular_grid": ("study", "centered"),
    "singular_beyond_rank": BEYOND_RANK_RULES,
    "zero_matrix_gap": ("zero", "nan"),
    "last_hidden": ("final_norm", "block_output"),
    "intruder_side": ("left", "right"),
}



def trim_default_ks(fields: dict) -> dict:
    """One rule for the CLI and study files: a `singular_k_max` given without `singular_ks` keeps
    the default Ks up to it (or K = k_max alone); Ks given explicitly must fit (validate says so)."""
    if fields.get("singular_k_max") is not None and "singular_ks" not in fields:
        k_max = int(fields["singular_k_max"])
        default = AnalysisSettings.__dataclass_fields__["singular_ks"].default
        fields = {**fields, "singular_ks": tuple(k for k in default if k <= k_max) or (k_max,)}
    return fields

@dataclass
class AnalysisSettings:
    # Which families, and which checkpoint steps (None = every checkpoint of every run).
    metrics: tuple[str, ...] = FAMILIES
    steps: tuple[int, ...] | None = None
    # Probe set: the first `probe_size` sequences of the runs' probe split (None = all of it).
    probe_size: int | None = None
    batch_size: int = 32  # sequences per forward pass
    device: str = "auto"
    # L(θ) on the probe set: the mean of per-batch mean losses (`batch_mean`, the study's
    # compute_nll_loss) or the exact token-weighted mean (`token`). With no padding and a probe
    # size that is a multiple of batch_size the two agree.
    loss_average: str = "batch_mean"

    # Landscape (METRICS.md §1).
    directions: int = 100
    grid_points: int = DEFAULT_GRID_POINTS
    random_radius: float = DEFAULT_RANDOM_RADIUS
    singular_radius: float = DEFAULT_SINGULAR_RADIUS  # the `centered` singular grid
    # `study`: numpy.arange(*singular_study_grid), ES around index len // 2 (the study's grid, no
    # α = 0); `centered`: grid_points over ±singular_radius with 0 in the middle (ours).
    singular_grid: str = "study"
    singular_study_grid: tuple[float, float, float] = STUDY_SINGULAR_GRID  # (x_min, x_max, x_interval)
    # k beyond a matrix's components: `clamp` reuses the last one (study), `zero` perturbs nothing (ours).
    singular_beyond_rank: str = "clamp"
    scopes: tuple[str, ...] = ("all",)
    filter_normalized: bool = False  # adds the `random_filter` direction set
    singular_k_max: int = 20
    singular_ks: tuple[int, ...] = (1, 5, 10, 20)
    singular_unweighted: bool = True  # adds the `singular_unweighted` direction set
    trajectory_components: int = 2  # trajectory PCA needs components + 2 checkpoints
    space: str = "native"
    direction_seed: int = 0

    # Interpolation (§2).
    interpolation_points: int = DEFAULT_INTERPOLATION_POINTS
    # IMBH needs every pair of runs at a step; False computes it at each run's last analysed
    # step only (the heat map and the predictor use that one), which cuts its cost by the
    # number of checkpoints.
    imbh_every_checkpoint: bool = True

    # Spectral (§3).
    spectral_threshold: float = DEFAULT_THRESHOLD
    spectral_factors: bool = True  # also the factors of every factored layer
    rank_tol: float = DEFAULT_RANK_TOL  # numerical rank: #σ > rank_tol (the study's absolute tolerance)
    zero_matrix_gap: str = "zero"  # spectral gap and σ2/σ1 of an all-zero matrix: 0 (study) or nan (ours)

    # Similarity (§4).
    mask_padding: bool = True
    # The last layer's activations: after the final RMSNorm (`final_norm`, HF hidden_states as the
    # study reads them) or the raw output of the last block (`block_output`).
    last_hidden: str = "final_norm"

    # Intruder dimensions (docs/metrics.md): of each matrix's top intruder_k singular vectors, those whose largest
    # |cosine| with the reference's singular vectors is below intruder_threshold (official k 10,
    # ε 0.5, left singular vectors; `right` is ours).
    intruder_k: int = 10
    intruder_threshold: float = 0.5
    intruder_side: str = "left"

    # 2-D landscape: L(θ + x·d1 + y·d2) on a points × points grid over the 1-D radii, for a
    # pair of random directions and the top-2 singular directions; at the last step unless
    # landscape2d_every_checkpoint (points² forward passes per pair and checkpoint).
    landscape2d_points: int = 11
    landscape2d_pairs: tuple[str, ...] = ("random", "singular")
    landscape2d_every_checkpoint: bool = False

    # Hessian of the probe loss (Hessian-vector products by double backward; docs/metrics.md):
    # its largest and smallest algebraic eigenvalues by Lanczos (one Krylov space for both, at
    # most hessian_iterations HVPs; an estimate converges when its relative residual
    # ‖Hy − θy‖ / |θ| is <= hessian_tolerance, so H has an eigenvalue within that fraction of it)
    # and its trace by Hutchinson's estimator with hessian_samples Rademacher vectors (converged
    # when its standard error is <= hessian_trace_max_relative_se of |trace|). An estimate that
    # did not converge keeps its value, marked, and is no finding. Lanczos keeps its vectors:
    # up to hessian_iterations × parameters × 8 bytes. At the last step unless hessian_every_checkpoint.
    hessian_iterations: int = 100
    hessian_tolerance: float = 1e-2
    hessian_samples: int = 10
    hessian_trace_max_relative_se: float = 0.1
    hessian_every_checkpoint: bool = False

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes kept in meta.json

    def __post_init__(self) -> None:
        self.metrics = tuple(self.metrics)
        self.scopes = tuple(self.scopes)
        self.landscape2d_pairs = tuple(self.landscape2d_pairs)
        self.singular_study_grid = tuple(float(v) for v in self.singular_study_grid)
        self.singular_ks = tuple(sorted(set(self.singular_ks)))
        if self.steps is not None:
            self.steps = tuple(sorted(set(int(s) for s in self.steps)))

    def validate(self) -> None:
        """Raise AnalysisError (a RankscopeError) for any bad setting, naming the fix."""
        for name in self.metrics:
            if name not in FAMILIES:
                raise AnalysisError(f"unknown analysis metric family {name!r}{did_you_mean(name, FAMILIES)}; choose from {', '.join(FAMILIES)}")
        if not self.metrics:
            raise AnalysisError(f"no metric family selected; pass --metrics with some of {', '.join(FAMILIES)}")
        for scope in self.scopes:
            if scope not in SCOPES:
                raise AnalysisError(f"unknown landscape scope {scope!r}{did_you_mean(scope, SCOPES)}; use all or blocks")
        if not self.scopes:
            raise AnalysisError("no landscape scope selected; use --scope all, blocks or all,blocks")
        if self.space not in SPACES:
            raise AnalysisError(f"unknown parameter space {self.space!r}{did_you_mean(self.space, SPACES)}; use native or dense")
        if self.grid_points < 3 or self.grid_points % 2 == 0:
            raise AnalysisError(f"--grid-points must be odd and >= 3 so the grid contains α = 0, got {self.grid_points}")
        if self.directions < 1:
            raise AnalysisError(f"--directions must be >= 1, got {self.directions}")
        if self.random_radius <= 0 or self.singular_radius <= 0:
            raise AnalysisError("landscape radii must be > 0")
        if self.singular_k_max < 1 or not self.singular_ks or min(self.singular_ks) < 1:
            raise AnalysisError("singular_k_max and every singular K must be >= 1")
        if max(self.singular_ks) > self.singular_k_max:
            raise AnalysisError(
                f"singular K values {list(self.singular_ks)} exceed singular_k_max={self.singular_k_max}; raise it or drop the larger K"
            )
        if self.trajectory_components < 1:
            raise AnalysisError(f"trajectory_components must be >= 1, got {self.trajectory_components}")
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise AnalysisError(f"unknown {name} {value!r}{did_you_mean(str(value), choices)}; choose from {', '.join(choices)}")
        if len(self.singular_study_grid) != 3:
            raise AnalysisError(f"singular_study_grid is (x_min, x_max, x_interval), got {list(self.singular_study_grid)}")
        x_min, x_max, step = self.singular_study_grid
        if not (step > 0 and x_max > x_min and (x_max - x_min) / step >= 3):
            raise AnalysisError(
                f"singular_study_grid {list(self.singular_study_grid)} must give >= 3 points (x_min < x_max, x_interval > 0)"
            )
        if self.landscape2d_points < 3 or self.landscape2d_points % 2 == 0:
            raise AnalysisError(f"landscape2d_points must be odd and >= 3 so the grid contains (0, 0), got {self.landscape2d_points}")
        for pair in self.landscape2d_pairs:
            if pair not in ("random", "singular"):
                raise AnalysisError(f"unknown 2-D landscape pair {pair!r}{did_you_mean(pair, ('random', 'singular'))}; use random or singular")
        if self.hessian_iterations < 1:
            raise AnalysisError(f"hessian_iterations (the most HVPs Lanczos may use) must be >= 1, got {self.hessian_iterations}")
        if not 0 < self.hessian_tolerance < 1:
            raise AnalysisError(f"hessian_tolerance (relative residual of a converged eigenvalue) must be in (0, 1), "
                                f"got {self.hessian_tolerance}; 1e-2 is the default")
        if self.hessian_samples < 1:
            raise AnalysisError(f"hessian_samples must be >= 1 (>= 2 to know the trace's standard error), got {self.hessian_samples}")
        if not self.hessian_trace_max_relative_se > 0:
            raise AnalysisError(f"hessian_trace_max_relative_se must be > 0 (0.1: standard error <= 10 % of |trace|), "
                                f"got {self.hessian_trace_max_relative_se}")
        if not self.rank_tol >= 0:
            raise AnalysisError(f"rank_tol must be >= 0, got {self.rank_tol}")
        if self.intruder_k < 1 or not 0 < self.intruder_threshold <= 1:
            raise AnalysisError(f"intruder_k must be >= 1 and intruder_threshold in (0, 1], got {self.intruder_k} and "
                                f"{self.intruder_threshold} (official: 10 and 0.5)")
        if self.interpolation_points < 3:
            raise AnalysisError(f"interpolation needs >= 3 points, got {self.interpolation_points}")
        if self.batch_size < 1:
            raise AnalysisError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.probe_size is not None and self.probe_size < 1:
            raise AnalysisError(f"--probe-size must be >= 1, got {self.probe_size}")
        if self.steps is not None and not self.steps:
            raise AnalysisError("--steps is empty; pass steps like 100,200 or leave it out for every checkpoint")

    # -- hashing ---------------------------------------------------------------------------------

    def family_settings(self, family: str) -> dict[str, Any]:
        """The settings that decide the numbers of one item family (landscape:<set>:<scope>, ...)."""
        head = family.split(":")[0]
        loss = {"loss_average": self.loss_average}
        if head == "landscape":
            direction_set = family.split(":")[1]
            common = {"grid_points": self.grid_points, "space": self.space, **loss}
            if direction_set in ("random", "random_filter"):
                return {**common, "directions": self.directions, "radius": self.random_radius, "seed": self.direction_seed}
            if direction_set in ("singular", "singular_unweighted"):
                return {**common, "k_max": self.singular_k_max, "ks": list(self.singular_ks), "radius": self.singular_radius,
                        "grid": self.singular_grid, "study_grid": list(self.singular_study_grid),
                        "beyond_rank": self.singular_beyond_rank}
            return {**common, "components": self.trajectory_components}
        if head == "landscape2d":
            return {"points": self.landscape2d_points, "random_radius": self.random_radius, "singular_radius": self.singular_radius,
                    "seed": self.direction_seed, "space": self.space, "beyond_rank": self.singular_beyond_rank, **loss}
        if head == "interpolation":
            return {"points": self.interpolation_points, **loss}
        if head == "spectral":
            return {"threshold": self.spectral_threshold, "factors": self.spectral_factors, "rank_tol": self.rank_tol,
                    "zero_matrix_gap": self.zero_matrix_gap}
        if head == "similarity":
            return {"mask_padding": self.mask_padding, "last_hidden": self.last_hidden}
        if head == "intruder":
            return {"k": self.intruder_k, "threshold": self.intruder_threshold, "side": self.intruder_side}
        if head == "hessian":
            return {"eigenvalues": "lanczos", "iterations": self.hessian_iterations, "tolerance": self.hessian_tolerance,
                    "samples": self.hessian_samples, "trace_max_relative_se": self.hessian_trace_max_relative_se,
                    "seed": self.direction_seed, **loss}
        raise AnalysisError(f"unknown item family {family!r}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def settings_hash(payload: dict[str, Any]) -> str:
    """Short stable hash of a JSON-able dict (sorted keys)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
