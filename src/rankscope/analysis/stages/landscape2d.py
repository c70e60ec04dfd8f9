"""Stage `landscape2d`: the loss surface L(θ + x·d1 + y·d2) − L(θ) on a square grid, for a pair of
random directions and for the top-2 singular directions, as contour figures show it.

The study draws such surfaces with ``Landscape4Model`` in its ``contour``/``3D`` modes (x and y
two independent Gaussian directions) and describes ``Landscape4ModelPCA``'s 2-D directions as the
rank-1 and rank-2 components of every weight (low-rank-geometry,
loss-landscape/LLMLandscape/utils/plot/Landscape4Model.py). Here the random pair is directions 0
and 1 of the seeded random set of the 1-D landscape, the singular pair its singular directions
k = 1 and k = 2 (σ-weighted); each axis spans the 1-D radius of its set, with (0, 0) in the
middle. A surface costs points² forward passes, so by default it is drawn at the last step only.

Rows go to landscape2d.csv (per pair and scope: ES along each axis through the centre, the
mean rise over the plane and centre-to-minimum), surfaces to landscape2d_surfaces.npz.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rankscope.analysis import landscape as land
from rankscope.analysis.probe import Probe
from rankscope.analysis.settings import settings_hash
from rankscope.analysis.space import ParameterSpace, scope_parameter_names
from rankscope.analysis.stages.base import Stage
from rankscope.analysis.stages.landscape import random_direction_set, singular_direction_set
from rankscope.analysis.store import KEY_COLUMNS, Item, TableSpec

SURFACE_METRICS = ("expected_sharpness_x", "expected_sharpness_y", "mean_rise", "center_to_min")


@dataclass
class Surface:
    values: np.ndarray  # (len(ys), len(xs)): L(θ + x d1 + y d2) − L(θ); the (0, 0) entry is exactly 0
    xs: np.ndarray
    ys: np.ndarray
    base_loss: float


def evaluate_surface(
    space: ParameterSpace, probe: Probe, d1: Mapping[str, torch.Tensor], d2: Mapping[str, torch.Tensor],
    xs: Sequence[float] | torch.Tensor, ys: Sequence[float] | torch.Tensor,
) -> Surface:
    """The loss surface on the grid xs × ys, every point written afresh from the fp32 master."""
    x_axis, y_axis = land.check_grid(xs), land.check_grid(ys)
    d1 = {n: t.to(probe.device) for n, t in d1.items()}
    d2 = {n: t.to(probe.device) for n, t in d2.items()}
    space.restore()
    base = probe.loss(space.model)
    values = np.zeros((y_axis.numel(), x_axis.numel()), dtype=np.float64)
    try:
        for i, y in enumerate(y_axis.tolist()):
            for j, x in enumerate(x_axis.tolist()):
                if x == 0.0 and y == 0.0:
                    continue
                space.set_plane_point(x, y, d1, d2)
                values[i, j] = probe.loss(space.model) - base
    finally:
        space.restore()
    return Surface(values, x_axis.numpy(), y_axis.numpy(), base)


def surface_summary(surface: Surface) -> dict[str, float]:
    """ES along each axis through (0, 0), the mean of the surface, and centre-to-minimum."""
    row = int(np.flatnonzero(surface.ys == 0.0)[0])
    column = int(np.flatnonzero(surface.xs == 0.0)[0])
    return {
        "expected_sharpness_x": float(land.expected_sharpness(torch.as_tensor(surface.values[row]), surface.xs)),
        "expected_sharpness_y": float(land.expected_sharpness(torch.as_tensor(surface.values[:, column]), surface.ys)),
        "mean_rise": float(surface.values.mean()),
        "center_to_min": float(surface.values[row, column] - surface.values.min()),
    }


class Landscape2DStage(Stage):
    table = TableSpec(
        "landscape2d", KEY_COLUMNS + ["pair", "scope", "metric", "value"], arrays_file="landscape2d_surfaces.npz",
    )

    def plan(self, step: int, steps: Sequence[int]) -> list[Item]:
        s = self.settings
        if self.at_last_step_only(s.landscape2d_every_checkpoint, step, steps):
            return []
        items = []
        for pair in s.landscape2d_pairs:
            for scope in s.scopes:
                family = f"landscape2d:{pair}:{scope}"
                payload = {"settings": s.family_settings("landscape2d"), "probe": self.probe.fingerprint}
                items.append(Item(step, family, settings_hash(payload), {"pair": pair, "scope": scope}))
        return items

    @classmethod
    def describe(cls, run, context) -> dict[str, Any]:
        s = context.settings
        return {"grids": {f"landscape2d_{pair}": axis(s, pair).tolist() for pair in ("random", "singular")}}

    def compute(self, item: Item) -> dict[str, Any]:
        s = self.settings
        pair, scope = item.context["pair"], item.context["scope"]
        model, note = self.model_in_space(item.step)
        space = ParameterSpace(model)
        names = scope_parameter_names(model, scope)
        if pair == "random":
            d1, d2 = random_direction_set(space, names, 2, s.direction_seed, False, self.probe.device)
        else:
            d1, d2 = singular_direction_set(space, names, 2, True, s.singular_beyond_rank)
        grid = axis(s, pair)
        surface = evaluate_surface(space, self.probe, d1, d2, grid, grid)
        self.progress.advance(1.0)
        rows = [{"pair": pair, "scope": scope, "metric": metric, "value": value} for metric, value in surface_summary(surface).items()]
        return {
            "rows": rows, "base_loss": surface.base_loss, "notes": {"space_used": note},
            "arrays": {f"{pair}/{scope}/step_{item.step:06d}": surface.values.tolist(), f"axes/{pair}": surface.xs.tolist()},
        }


def axis(settings, pair: str) -> torch.Tensor:
    """Both axes of a pair's surface: landscape2d_points over the 1-D radius of its direction set."""
    radius = settings.random_radius if pair == "random" else settings.singular_radius
    return land.make_grid(settings.landscape2d_points, radius)
