"""Stage `interpolation` (METRICS.md §2): loss along the straight line between two parameter sets
and its barrier height.

- **CCBH**: consecutive checkpoints of one run, in the method's native parameters.
- **IMBH**: two runs at the same step, in dense space (every linear merged to its effective
  weight); a method without a dense equivalent (CoLA) gets a not-applicable row with the reason.

IMBH partners are the run's references (the full-rank run of its seed, and the full-rank runs of
the other seeds given as baseline references) and the other runs of its preset and seed; each
row names the partner's seed and the ``pairing`` (self | same-seed | cross-seed). A full-rank
run's cross-seed rows are the seed baseline of the barrier.

Every point is formed afresh from the two endpoints, never by stepping from the previous one.
:func:`pair_curve` takes any two runs, so a seed baseline (two full-rank runs of different
seeds) is one more pair. Rows go to interpolation.csv, curves to interpolation_curves.npz.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from rankscope.analysis import interpolation as interp
from rankscope.analysis.context import AnalysisContext, RunInfo, pairing
from rankscope.analysis.probe import Probe
from rankscope.analysis.settings import settings_hash
from rankscope.analysis.space import ParameterSpace, build_dense_model
from rankscope.analysis.stages.base import Stage
from rankscope.analysis.store import KEY_COLUMNS, Item, TableSpec
from rankscope.errors import AnalysisError
from rankscope.models import LlamaConfig


def interpolation_curve(
    space: ParameterSpace,
    probe: Probe,
    theta_a: Mapping[str, torch.Tensor],
    theta_b: Mapping[str, torch.Tensor],
    n_points: int = interp.DEFAULT_INTERPOLATION_POINTS,
) -> np.ndarray:
    """L((1−α)θ_a + αθ_b) for α = linspace(0, 1, n_points); every point computed from the two
    endpoints. ``theta_a`` and ``theta_b`` name a subset of the space's parameters; the rest stay
    at the space's master. The model is restored afterwards."""
    device = probe.device
    a = {n: t.to(device) for n, t in theta_a.items()}
    b = {n: t.to(device) for n, t in theta_b.items()}
    losses = []
    try:
        for alpha in interp.interpolation_alphas(n_points).tolist():
            space.set_values(interp.interpolate(a, b, alpha))
            losses.append(probe.loss(space.model))
    finally:
        space.restore()
    return np.asarray(losses, dtype=np.float64)


def barrier_row(curve: np.ndarray) -> dict[str, Any]:
    return {
        "applicable": True, "reason": "",
        "barrier": float(interp.barrier(torch.as_tensor(curve))),
        "relative_barrier": float(interp.relative_barrier(torch.as_tensor(curve))),
        "loss_a": float(curve[0]), "loss_b": float(curve[-1]),
    }


def not_applicable_row(reason: str) -> dict[str, Any]:
    nan = float("nan")
    return {"applicable": False, "reason": reason, "barrier": nan, "relative_barrier": nan, "loss_a": nan, "loss_b": nan}


def ccbh_curve(
    model: nn.Module, previous_state: Mapping[str, torch.Tensor], probe: Probe, n_points: int = interp.DEFAULT_INTERPOLATION_POINTS,
    space: ParameterSpace | None = None,
) -> np.ndarray:
    """Loss along the straight line from a previous checkpoint's native parameters to the model's.

    Raises AnalysisError when the two checkpoints differ in a non-parameter tensor (an integer
    buffer such as a sparse support), which a parameter interpolation cannot move.
    """
    space = space or ParameterSpace(model)
    params = set(dict(model.named_parameters()))
    for name, tensor in model.state_dict().items():
        if name in params or name not in previous_state:
            continue
        if not torch.equal(tensor.cpu(), previous_state[name].cpu()):
            raise AnalysisError(f"buffer {name!r} differs between the checkpoints, so they cannot be interpolated")
    missing = [n for n in space.names if n not in previous_state]
    if missing:
        raise AnalysisError(f"the previous checkpoint lacks {missing[:3]}")
    theta_a = {n: previous_state[n] for n in space.names}
    return interpolation_curve(space, probe, theta_a, space.master, n_points)


def imbh_curve(
    dense_a: Mapping[str, torch.Tensor],
    dense_b: Mapping[str, torch.Tensor],
    model_config: LlamaConfig,
    probe: Probe,
    n_points: int = interp.DEFAULT_INTERPOLATION_POINTS,
) -> np.ndarray:
    """Loss along the straight line between two dense state dicts, in a plain LlamaModel."""
    plain = build_dense_model(model_config, dense_a, probe.device)
    space = ParameterSpace(plain)
    theta_a = {n: dense_a[n] for n in space.names}
    theta_b = {n: dense_b[n] for n in space.names}
    return interpolation_curve(space, probe, theta_a, theta_b, n_points)


def pair_curve(context: AnalysisContext, run: RunInfo, other: RunInfo, step: int) -> tuple[np.ndarray | None, str]:
    """The dense-space curve from ``run`` to ``other`` at ``step`` (any two runs of one shape),
    or None and the reason; computed once per unordered pair (the reverse is the same path)."""
    here, there = str(run.path.resolve()), str(other.path.resolve())
    cache = context.pair_curves
    if (there, here, step) in cache:  # computed from the other side: same path reversed
        curve, reason = cache[(there, here, step)]
        return (None if curve is None else curve[::-1].copy()), reason
    if (here, there, step) not in cache:
        cache[(here, there, step)] = _compute_pair(context, run, other, step)
    return cache[(here, there, step)]


def _compute_pair(context: AnalysisContext, run: RunInfo, other: RunInfo, step: int) -> tuple[np.ndarray | None, str]:
    models, probe, n_points = context.models, context.probe, context.settings.interpolation_points
    if other.path.resolve() == run.path.resolve():
        # A run against itself (the reference's own row): every point is the same model.
        loss = probe.loss(models.get(run, step).model)
        return np.full(n_points, loss), ""
    if step not in other.steps:
        return None, f"run {other.name} has no checkpoint at step {step} (it has {other.steps})"
    if other.model_config != run.model_config:
        return None, f"run {other.name} has another model shape"
    dense_a = models.dense(run, step)
    if isinstance(dense_a, str):
        return None, dense_a
    dense_b = models.dense(other, step)
    if isinstance(dense_b, str):
        return None, f"{other.name}: {dense_b}"
    loaded = models.get(run, step)
    return imbh_curve(dense_a, dense_b, loaded.model_config, probe, n_points), ""


class InterpolationStage(Stage):
    table = TableSpec(
        "interpolation", KEY_COLUMNS + [
            "kind", "step_a", "step_b", "other_run", "other_method", "other_seed", "pairing", "space", "applicable", "reason",
            "barrier", "relative_barrier", "loss_a", "loss_b",
        ],
        arrays_file="interpolation_curves.npz", integer_columns=("other_seed",),
    )

    def plan(self, step: int, steps: Sequence[int]) -> list[Item]:
        s = self.settings
        base = {"settings": s.family_settings("interpolation"), "probe": self.probe.fingerprint}
        items = []
        previous = self.run.previous_step(step)
        if previous is not None:
            items.append(Item(step, "interpolation:ccbh", settings_hash({**base, "previous": previous}), {"previous": previous}))
        imbh_here = not self.at_last_step_only(s.imbh_every_checkpoint, step, steps)
        for other in (self.context.others(self.run) if imbh_here else []):
            # The partner's seed decides the row's pairing label, so it keys the item too.
            payload = {**base, "other": str(other.path.resolve()), "other_seed": other.seed}
            items.append(Item(step, f"interpolation:imbh:{other.name}", settings_hash(payload), {"other": other}))
        return items

    @classmethod
    def describe(cls, run, context) -> dict[str, Any]:
        return {
            "grids": {"interpolation": interp.interpolation_alphas(context.settings.interpolation_points).tolist()},
            "imbh_partners": {o.name: pairing(run, o) for o in context.others(run)},
        }

    def compute(self, item: Item) -> dict[str, Any]:
        from rankscope.train import checkpoint as ckpt

        step = item.step
        self.progress.advance(1.0)
        if item.family == "interpolation:ccbh":
            previous = item.context["previous"]
            head = {"kind": "ccbh", "step_a": previous, "step_b": step, "other_run": "", "other_method": "", "other_seed": None,
                    "pairing": "", "space": "native"}
            loaded = self.context.models.get(self.run, step)
            state = ckpt.load_model_state(self.run.checkpoint(previous).path)
            try:
                curve = ccbh_curve(loaded.model, state, self.probe, self.settings.interpolation_points)
            except AnalysisError as exc:
                return {"rows": [{**head, **not_applicable_row(str(exc))}], "arrays": {}}
            return {"rows": [{**head, **barrier_row(curve)}], "arrays": {f"ccbh//step_{step:06d}": curve.tolist()}}

        other: RunInfo = item.context["other"]
        head = {"kind": "imbh", "step_a": step, "step_b": step, "other_run": other.name, "other_method": other.method,
                "other_seed": other.seed, "pairing": pairing(self.run, other), "space": "dense"}
        curve, reason = pair_curve(self.context, self.run, other, step)
        if curve is None:
            return {"rows": [{**head, **not_applicable_row(reason)}], "arrays": {}}
        return {"rows": [{**head, **barrier_row(curve)}], "arrays": {f"imbh/{other.name}/step_{step:06d}": curve.tolist()}}
