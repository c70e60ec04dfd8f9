"""Stage `landscape` (METRICS.md §1): 1-D loss profiles along random, singular and trajectory-PCA
directions, and their summaries (expected sharpness, direction variance, centre-to-minimum).

One item per (checkpoint, direction set, scope). Each perturbs the method's native parameters
(or the merged dense weights with ``space=dense``), writing every point θ + α·d afresh from the
fp32 master; the α = 0 loss is evaluated before and after each sweep and must agree bit for bit.
Rows go to landscape.csv, the full profiles to landscape_profiles.npz.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from rankscope.analysis import landscape as land
from rankscope.analysis.probe import Probe
from rankscope.analysis.settings import AnalysisSettings, settings_hash
from rankscope.analysis.space import ParameterSpace, scope_parameter_names
from rankscope.analysis.stages.base import Stage
from rankscope.analysis.store import KEY_COLUMNS, Item, TableSpec
from rankscope.errors import AnalysisError

log = logging.getLogger("rankscope.analysis")

LANDSCAPE_METRICS = ("expected_sharpness", "direction_variance", "center_to_min")


@dataclass
class LandscapeProfiles:
    profiles: np.ndarray  # (n_directions, G): L(θ + α d) − L(θ); the α = 0 column is exactly 0
    alphas: np.ndarray  # (G,)
    base_loss: float  # L(θ) before the sweep
    center_loss_after: float  # L(θ) re-evaluated after the sweep (== base_loss bit for bit)


def evaluate_profiles(
    space: ParameterSpace,
    probe: Probe,
    directions: Iterable[Mapping[str, torch.Tensor]],
    alphas: Sequence[float] | torch.Tensor,
    on_direction: Callable[[], None] | None = None,
) -> LandscapeProfiles:
    """L(θ + α·d) − L(θ) for every direction and every α of the grid (any increasing grid: the
    study's singular grid has no α = 0).

    L(θ) is evaluated once before and once after the sweep; where the grid holds α = 0 exactly
    that point is L(θ) itself and is not evaluated again per direction (θ + 0·d is θ). The two
    evaluations of L(θ) must agree bit for bit (the model is restored exactly); a mismatch is logged.
    """
    grid = land.check_grid(alphas)
    space.restore()
    base = probe.loss(space.model)
    rows = []
    try:
        for direction in directions:
            direction = {n: d.to(probe.device) for n, d in direction.items()}
            losses = np.zeros(grid.numel(), dtype=np.float64)
            for j, alpha in enumerate(grid.tolist()):
                if alpha == 0.0:
                    continue
                space.set_point(alpha, direction)
                losses[j] = probe.loss(space.model) - base
            rows.append(losses)
            if on_direction is not None:
                on_direction()
    finally:
        space.restore()
    after = probe.loss(space.model)
    if after != base:
        # The parameters are restored bit for bit from the master, so on a deterministic backend
        # this cannot happen; on a GPU a non-deterministic kernel could cost an ulp. Recorded in
        # the result (center_loss_after) and logged rather than fatal.
        log.warning("L(θ) was %r before the landscape sweep and %r after it", base, after)
    if not rows:
        raise AnalysisError("no directions to evaluate")
    return LandscapeProfiles(np.stack(rows), grid.numpy(), base, after)


def landscape_summary_rows(
    profiles: np.ndarray, alphas: np.ndarray, direction_set: str, scope: str, k_max: int | None = None,
    center: int | None = None,
) -> list[dict[str, Any]]:
    """The three summary numbers of a set of profiles, as landscape.csv rows (without the keys);
    ``center`` as in :func:`rankscope.analysis.landscape.expected_sharpness`."""
    summary = land.profile_summary(torch.as_tensor(profiles), torch.as_tensor(alphas), center)
    return [
        {"direction_set": direction_set, "k_max": k_max, "scope": scope, "metric": metric, "value": float(summary[metric])}
        for metric in LANDSCAPE_METRICS
    ]


def random_direction_set(
    space: ParameterSpace, scope_names: Sequence[str], n: int, seed: int, filter_normalized: bool, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    shapes = space.shapes(scope_names)
    reference = {name: space.master[name] for name in scope_names} if filter_normalized else None
    return land.random_directions(
        shapes, n, seed, normalization="filter" if filter_normalized else None, reference=reference, device=device
    )


def singular_direction_set(
    space: ParameterSpace, scope_names: Sequence[str], k_max: int, weighted: bool, beyond_rank: str = "clamp"
) -> Iterator[dict[str, torch.Tensor]]:
    weights = {name: space.master[name] for name in scope_names if space.master[name].ndim == 2}
    return land.singular_directions(weights, k_max=k_max, weighted=weighted, beyond_rank=beyond_rank)


def singular_grid(settings: AnalysisSettings) -> tuple[torch.Tensor, int | None]:
    """The α axis of the singular direction sets and its centre index (None: the α = 0 of a
    symmetric grid). ``study``: numpy.arange(*singular_study_grid), centre len // 2, as the
    study's 3b_landscape_2d_pca_topk_components_variants.py / 4b_pca_aggregate_subsets.py."""
    if settings.singular_grid == "study":
        alphas = land.arange_grid(*settings.singular_study_grid)
        return alphas, land.middle_index(alphas.numel())
    return land.make_grid(settings.grid_points, settings.singular_radius), None


def singular_summary_rows(
    profiles: np.ndarray, alphas: np.ndarray, direction_set: str, scope: str, ks: Sequence[int], center: int | None = None,
) -> list[dict[str, Any]]:
    """Summaries over the first K singular directions for every K (the study's top-K subsets)."""
    rows = []
    for k in ks:
        rows += landscape_summary_rows(profiles[: min(k, profiles.shape[0])], alphas, direction_set, scope, k_max=k, center=center)
    return rows


def landscape_family(
    model: nn.Module, probe: Probe, settings: AnalysisSettings | None = None, scope: str = "all"
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Random (and filter-normalized) and singular landscapes of one loaded model: landscape.csv
    rows (without the key columns) and ``{direction_set: profiles}``. Trajectory PCA needs a
    run's checkpoints and is left to the stage."""
    s = settings or AnalysisSettings()
    space = ParameterSpace(model)
    names = scope_parameter_names(model, scope)
    rows: list[dict[str, Any]] = []
    profiles: dict[str, np.ndarray] = {}
    random_sets = ["random"] + (["random_filter"] if s.filter_normalized else [])
    for direction_set in random_sets:
        directions = random_direction_set(space, names, s.directions, s.direction_seed, direction_set == "random_filter", probe.device)
        result = evaluate_profiles(space, probe, directions, land.make_grid(s.grid_points, s.random_radius))
        rows += landscape_summary_rows(result.profiles, result.alphas, direction_set, scope)
        profiles[direction_set] = result.profiles
    alphas, center = singular_grid(s)
    for direction_set in ["singular"] + (["singular_unweighted"] if s.singular_unweighted else []):
        directions = singular_direction_set(space, names, s.singular_k_max, direction_set == "singular", s.singular_beyond_rank)
        result = evaluate_profiles(space, probe, directions, alphas)
        rows += singular_summary_rows(result.profiles, result.alphas, direction_set, scope, s.singular_ks, center)
        profiles[direction_set] = result.profiles
    return rows, profiles


def trajectory_directions(
    snapshots: Sequence[Mapping[str, torch.Tensor]], n_components: int
) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """Trajectory-PCA directions scaled so that α = ±1 reaches the farthest checkpoint along each
    component (the unit directions would make any fixed radius meaningless across runs)."""
    pca = land.trajectory_pca_directions(snapshots, n_components=n_components)
    scales = pca.coordinates.abs().amax(0).tolist()
    directions = [{n: t * scale for n, t in d.items()} for d, scale in zip(pca.directions, scales)]
    return directions, pca.explained_variance_ratio.tolist()


def direction_sets(settings: AnalysisSettings) -> list[str]:
    sets = ["random"]
    if settings.filter_normalized:
        sets.append("random_filter")
    sets.append("singular")
    if settings.singular_unweighted:
        sets.append("singular_unweighted")
    sets.append("trajectory_pca")
    return sets


class LandscapeStage(Stage):
    table = TableSpec(
        "landscape", KEY_COLUMNS + ["direction_set", "k_max", "scope", "metric", "value"],
        arrays_file="landscape_profiles.npz", integer_columns=("k_max",),
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._spaces: dict[tuple[int, str], tuple[ParameterSpace, str]] = {}
        self._trajectory: dict[str, tuple[list[dict[str, torch.Tensor]], list[float]] | str] = {}

    def plan(self, step: int, steps: Sequence[int]) -> list[Item]:
        s = self.settings
        items = []
        for direction_set in direction_sets(s):
            for scope in s.scopes:
                family = f"landscape:{direction_set}:{scope}"
                payload = {"settings": s.family_settings(family), "probe": self.probe.fingerprint}
                if direction_set == "trajectory_pca":
                    payload["checkpoints"] = self.run.steps
                items.append(Item(step, family, settings_hash(payload), {"direction_set": direction_set, "scope": scope}))
        return items

    @classmethod
    def describe(cls, run, context) -> dict[str, Any]:
        s = context.settings
        alphas, center = singular_grid(s)
        singular_note = (
            f"the study's grid numpy.arange{tuple(s.singular_study_grid)}; summaries around index {center} "
            f"(alpha = {alphas[center].item():.6g}), the study's len // 2" if center is not None
            else "symmetric grid with alpha = 0 in the middle (singular_grid=centered)"
        )
        return {
            "grids": {
                "random": land.make_grid(s.grid_points, s.random_radius).tolist(),
                "singular": alphas.tolist(),
                "trajectory_pca": land.make_grid(s.grid_points, 1.0).tolist(),
            },
            "grid_notes": {
                "singular": singular_note,
                "trajectory_pca": "directions scaled so that alpha = +-1 reaches the farthest checkpoint along each component",
            },
            "directions": {
                "random": s.directions, "singular_k_max": s.singular_k_max, "singular_ks": list(s.singular_ks),
                "trajectory_components": s.trajectory_components, "seed": s.direction_seed,
            },
            "scopes": list(s.scopes), "space": s.space,
        }

    # -- the model a landscape perturbs ----------------------------------------------------------

    def space(self, step: int) -> tuple[ParameterSpace, str]:
        """The parameter space perturbed at ``step`` and a note on which space it is."""
        key = (step, self.settings.space)
        if key not in self._spaces:
            self._spaces.clear()  # one step at a time
            model, note = self.model_in_space(step)
            self._spaces[key] = (ParameterSpace(model), note)
        return self._spaces[key]

    def _snapshot(self, step: int, names: Sequence[str]) -> dict[str, torch.Tensor]:
        space, _ = self.space(step)
        return {n: space.master[n].to("cpu") for n in names}

    def trajectory(self, scope: str) -> tuple[list[dict[str, torch.Tensor]], list[float]] | str:
        """Trajectory-PCA directions of the run (for a scope), or why there are none."""
        if scope in self._trajectory:
            return self._trajectory[scope]
        needed = self.settings.trajectory_components + 2
        if len(self.run.steps) < needed:
            result: Any = f"not applicable: needs >= {needed} checkpoints, the run has {len(self.run.steps)}"
        else:
            snapshots = []
            names = None
            for step in self.run.steps:
                space, _ = self.space(step)
                names = names or scope_parameter_names(space.model, scope)
                snapshots.append(self._snapshot(step, names))
            self._spaces.clear()
            try:
                result = trajectory_directions(snapshots, self.settings.trajectory_components)
            except AnalysisError as exc:
                result = f"not applicable: {exc}"
        self._trajectory[scope] = result
        return result

    # -- one item ----------------------------------------------------------------------------------

    def compute(self, item: Item) -> dict[str, Any]:
        s = self.settings
        direction_set, scope = item.context["direction_set"], item.context["scope"]
        if direction_set == "trajectory_pca":
            trajectory = self.trajectory(scope)  # before space(step): it walks every checkpoint
            if isinstance(trajectory, str):
                self.progress.advance(1.0)
                return {"rows": [], "arrays": {}, "not_applicable": trajectory}
        space, space_note = self.space(item.step)
        names = scope_parameter_names(space.model, scope)
        device = self.probe.device
        notes: dict[str, Any] = {"space_used": space_note}
        center = None
        if direction_set in ("random", "random_filter"):
            count = s.directions
            directions = random_direction_set(space, names, count, s.direction_seed, direction_set == "random_filter", device)
            alphas = land.make_grid(s.grid_points, s.random_radius)
        elif direction_set in ("singular", "singular_unweighted"):
            count = s.singular_k_max
            directions = singular_direction_set(space, names, count, direction_set == "singular", s.singular_beyond_rank)
            alphas, center = singular_grid(s)
        else:
            directions, explained = trajectory  # type: ignore[misc]
            count = len(directions)
            alphas = land.make_grid(s.grid_points, 1.0)
            notes["explained_variance_ratio"] = explained
        result = evaluate_profiles(space, self.probe, directions, alphas, on_direction=lambda: self.progress.advance(1.0 / count))
        if direction_set.startswith("singular"):
            rows = singular_summary_rows(result.profiles, result.alphas, direction_set, scope, s.singular_ks, center)
        else:
            rows = landscape_summary_rows(result.profiles, result.alphas, direction_set, scope)
        key = f"{direction_set}/{scope}/step_{item.step:06d}"
        return {
            "rows": rows,
            "arrays": {key: result.profiles.tolist(), f"alphas/{direction_set}": result.alphas.tolist()},
            "base_loss": result.base_loss, "center_loss_after_sweep": result.center_loss_after, "notes": notes,
        }
