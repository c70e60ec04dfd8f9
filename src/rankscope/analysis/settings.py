"""`AnalysisSettings`: every knob of `rankscope analyze`, validated before any heavy work.

Defaults follow METRICS.md. The settings that decide a family's numbers are hashed into the key
of every finished item (see :meth:`AnalysisSettings.family_settings`), so a re-run with the same
settings skips finished work and a re-run with other settings recomputes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from rankscope.analysis import AnalysisError
from rankscope.analysis.interpolation import DEFAULT_INTERPOLATION_POINTS
from rankscope.analysis.landscape import DEFAULT_GRID_POINTS, DEFAULT_RANDOM_RADIUS, DEFAULT_SINGULAR_RADIUS
from rankscope.analysis.spectral import DEFAULT_THRESHOLD
from rankscope.errors import did_you_mean

FAMILIES: tuple[str, ...] = ("landscape", "interpolation", "spectral", "similarity")
SCOPES: tuple[str, ...] = ("all", "blocks")
SPACES: tuple[str, ...] = ("native", "dense")


@dataclass
class AnalysisSettings:
    # Which families, and which checkpoint steps (None = every checkpoint of every run).
    metrics: tuple[str, ...] = FAMILIES
    steps: tuple[int, ...] | None = None
    # Probe set: the first `probe_size` sequences of the runs' probe split (None = all of it).
    probe_size: int | None = None
    batch_size: int = 32  # sequences per forward pass
    device: str = "auto"

    # Landscape (METRICS.md §1).
    directions: int = 100
    grid_points: int = DEFAULT_GRID_POINTS
    random_radius: float = DEFAULT_RANDOM_RADIUS
    singular_radius: float = DEFAULT_SINGULAR_RADIUS
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

    # Similarity (§4).
    mask_padding: bool = True

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes kept in meta.json

    def __post_init__(self) -> None:
        self.metrics = tuple(self.metrics)
        self.scopes = tuple(self.scopes)
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
        if head == "landscape":
            direction_set = family.split(":")[1]
            common = {"grid_points": self.grid_points, "space": self.space}
            if direction_set in ("random", "random_filter"):
                return {**common, "directions": self.directions, "radius": self.random_radius, "seed": self.direction_seed}
            if direction_set in ("singular", "singular_unweighted"):
                return {**common, "k_max": self.singular_k_max, "ks": list(self.singular_ks), "radius": self.singular_radius}
            return {**common, "components": self.trajectory_components}
        if head == "interpolation":
            return {"points": self.interpolation_points}
        if head == "spectral":
            return {"threshold": self.spectral_threshold, "factors": self.spectral_factors}
        if head == "similarity":
            return {"mask_padding": self.mask_padding}
        raise AnalysisError(f"unknown item family {family!r}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def settings_hash(payload: dict[str, Any]) -> str:
    """Short stable hash of a JSON-able dict (sorted keys)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
