"""Stage `spectral` (METRICS.md §3): singular-value summaries of the attention and MLP matrices of
every block, of W and of the update ΔW = W_t − W_{t−1} between consecutive checkpoints.

One item per checkpoint. Every matrix gets its own rows and every (target, metric) an
equal-weight mean over matrices (``matrix = mean``). SVDs run in fp64, one batched call per
distinct shape. Rows go to spectral.csv.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from rankscope.analysis import spectral as spec
from rankscope.analysis.settings import settings_hash
from rankscope.analysis.space import dense_weight, layer_factors, target_modules
from rankscope.analysis.stages.base import Stage
from rankscope.analysis.store import KEY_COLUMNS, Item, TableSpec

_SPECTRAL_KEYS = {
    "effective_rank": "effective_rank", "effective_rank_normalized": "effective_rank_ratio",
    "stable_rank": "stable_rank", "spectral_gap": "spectral_gap", "count_above": "count_above",
    "count_above_normalized": "count_above_ratio", "frobenius_norm": "fro_norm",
}


def _by_shape(matrices: Mapping[str, torch.Tensor]) -> dict[tuple[int, ...], list[str]]:
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, W in matrices.items():
        groups.setdefault(tuple(W.shape), []).append(name)
    return groups


def _summaries(matrices: Mapping[str, torch.Tensor], threshold: float) -> dict[str, dict[str, float]]:
    """Spectral summary of every matrix, one batched SVD per distinct shape."""
    out: dict[str, dict[str, float]] = {}
    for shape, names in _by_shape(matrices).items():
        batch = torch.stack([matrices[n].to(torch.float64) for n in names])
        summary = spec.spectral_summary(batch, threshold)
        for i, name in enumerate(names):
            out[name] = {_SPECTRAL_KEYS[k]: float(summary[k][i]) for k in _SPECTRAL_KEYS}
    return out


def _delta_summaries(
    previous: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor], threshold: float
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    common = {n: current[n] for n in current if n in previous and previous[n].shape == current[n].shape}
    for shape, names in _by_shape(common).items():
        prev = torch.stack([previous[n].to(current[n].device, torch.float64) for n in names])
        nxt = torch.stack([current[n].to(torch.float64) for n in names])
        summary = spec.delta_summary(prev, nxt, threshold)
        for i, name in enumerate(names):
            values = {_SPECTRAL_KEYS[k]: float(summary[k][i]) for k in _SPECTRAL_KEYS if k != "frobenius_norm"}
            values["fro_norm"] = float(summary["delta_frobenius"][i])
            values["relative_fro_norm"] = float(summary["relative_delta_frobenius"][i])
            out[name] = values
    return out


def spectral_matrices(model: nn.Module, factors: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """``{target: {matrix name: tensor}}`` with target W (effective dense weight; absent for
    layers without one, e.g. CoLA) and, with ``factors``, factor_A / factor_B / ... of every
    factored layer."""
    out: dict[str, dict[str, torch.Tensor]] = {"W": {}}
    for target in target_modules(model):
        W = dense_weight(target.module)
        if W is not None:
            out["W"][target.name] = W
        if factors:
            for key, tensor in layer_factors(target.module).items():
                out.setdefault(key, {})[target.name] = tensor
    return out


def spectral_rows(
    model: nn.Module,
    previous_weights: Mapping[str, torch.Tensor] | None = None,
    threshold: float = spec.DEFAULT_THRESHOLD,
    factors: bool = True,
) -> list[dict[str, Any]]:
    """spectral.csv rows (without the keys): per matrix and the equal-weight mean over matrices,
    for W, the factors and, given the previous checkpoint's effective weights, ΔW.

    The mean ignores nan values (the spectral gap of a zero ΔW, e.g. a frozen base between ReLoRA
    merges, is undefined).
    """
    layers = {t.name: t.layer for t in target_modules(model)}
    matrices = spectral_matrices(model, factors)
    summaries: dict[str, dict[str, dict[str, float]]] = {}
    for target, mats in matrices.items():
        if mats:
            summaries[target] = _summaries(mats, threshold)
    if previous_weights is not None and matrices["W"]:
        summaries["dW"] = _delta_summaries(previous_weights, matrices["W"], threshold)
    order = ["W", "dW"] + sorted(t for t in summaries if t not in ("W", "dW"))
    rows: list[dict[str, Any]] = []
    for target in order:
        per_matrix = summaries.get(target)
        if not per_matrix:
            continue
        names = [n for n in layers if n in per_matrix]
        metrics = list(per_matrix[names[0]])
        for name in names:
            for metric in metrics:
                rows.append({"target": target, "matrix": name, "layer": layers[name], "metric": metric, "value": per_matrix[name][metric]})
        for metric in metrics:
            values = np.array([per_matrix[n][metric] for n in names], dtype=np.float64)
            mean = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
            rows.append({"target": target, "matrix": "mean", "layer": -1, "metric": metric, "value": mean})
    return rows


class SpectralStage(Stage):
    table = TableSpec("spectral", KEY_COLUMNS + ["target", "matrix", "layer", "metric", "value"])

    def plan(self, step: int, steps: Sequence[int]) -> list[Item]:
        previous = self.run.previous_step(step)
        payload = {"settings": self.settings.family_settings("spectral"), "previous": previous}
        return [Item(step, "spectral", settings_hash(payload), {"previous": previous})]

    def compute(self, item: Item) -> dict[str, Any]:
        models = self.context.models
        loaded = models.get(self.run, item.step)
        previous_weights = None
        previous = item.context["previous"]
        if previous is not None:
            prev_loaded = models.get(self.run, previous)
            previous_weights = {n: W.clone() for n, W in spectral_matrices(prev_loaded.model, factors=False)["W"].items()}
            loaded = models.get(self.run, item.step)  # keep it the most recent entry
        rows = spectral_rows(loaded.model, previous_weights, self.settings.spectral_threshold, self.settings.spectral_factors)
        self.progress.advance(1.0)
        return {"rows": rows, "arrays": {}}
