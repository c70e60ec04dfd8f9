"""Stage `spectral` (METRICS.md §3): singular-value summaries of the attention and MLP matrices of
every block, and of their updates ΔW = W_t − W_{t−1} between consecutive checkpoints.

Targets (the ``target`` column of spectral.csv):

- ``W_native`` / ``dW_native`` (the study's): every 2-D native parameter of the attention and MLP
  modules, each its own matrix: the weight of a dense layer, the factors A and B of a factored
  one, and base + A + B for LoRA/ReLoRA (low-rank-geometry, loss-landscape/scripts/
  single_checkpoint_scripts/5_ranks.py and 5_ranks_updates.py: ``named_parameters()`` with
  ``ndim == 2`` under ``attn``/``mlp``, both sides >= 2). Defined for every method, CoLA included.
- ``W`` / ``dW`` (ours, "merged"): the effective dense weight of each layer (B·A + base, B·A + S);
  not applicable, with the reason, for CoLA whose B·σ(A·x) has no dense equivalent.
- ``factor_A`` / ``factor_B`` (variant): the factors of every factored layer.

Every matrix gets its own rows; every (target, metric) gets the equal-weight mean over matrices
(``matrix = mean``, a plain mean as the study's, so an undefined value is never silently
dropped) and every update target the study's pooled numbers (``matrix = pooled``:
√Σ‖ΔW‖²_F, √Σ‖ΔW‖²_F / √Σ‖W_{t−1}‖²_F and Σ count above the threshold). SVDs run in fp64, one
batched call per distinct shape. Rows go to spectral.csv.
"""

from __future__ import annotations

import math
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

# spectral_summary key -> spectral.csv metric name
_SPECTRAL_KEYS = {
    "effective_rank": "effective_rank", "effective_rank_normalized": "effective_rank_ratio",
    "stable_rank": "stable_rank", "spectral_gap": "spectral_gap", "sv_ratio": "sv_ratio",
    "count_above": "count_above", "count_above_normalized": "count_above_ratio",
    "numerical_rank": "numerical_rank", "numerical_rank_normalized": "numerical_rank_ratio",
    "frobenius_norm": "fro_norm",
}
UPDATE_TARGETS = {"W_native": "dW_native", "W": "dW"}
NO_DENSE = "{method} has no dense weight (B·σ(A·x) is nonlinear); see W_native for its factors"
MIN_MATRIX_DIM = 2  # the study's --min_matrix_dim


def _by_shape(matrices: Mapping[str, torch.Tensor]) -> dict[tuple[int, ...], list[str]]:
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, W in matrices.items():
        groups.setdefault(tuple(W.shape), []).append(name)
    return groups


def _summaries(matrices: Mapping[str, torch.Tensor], threshold: float, rank_tol: float, undefined: float) -> dict[str, dict[str, float]]:
    """Spectral summary of every matrix, one batched SVD per distinct shape."""
    out: dict[str, dict[str, float]] = {}
    for _shape, names in _by_shape(matrices).items():
        batch = torch.stack([matrices[n].to(torch.float64) for n in names])
        summary = spec.spectral_summary(batch, threshold, rank_tol=rank_tol, undefined=undefined)
        for i, name in enumerate(names):
            out[name] = {_SPECTRAL_KEYS[k]: float(summary[k][i]) for k in _SPECTRAL_KEYS}
    return out


def _delta_summaries(
    previous: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor], threshold: float, rank_tol: float, undefined: float,
) -> dict[str, dict[str, float]]:
    """Summaries of ΔW per matrix, with ‖ΔW‖_F, ‖ΔW‖_F / ‖W_{t−1}‖_F and ‖W_{t−1}‖_F (for pooling)."""
    out: dict[str, dict[str, float]] = {}
    common = {n: current[n] for n in current if n in previous and previous[n].shape == current[n].shape}
    for _shape, names in _by_shape(common).items():
        prev = torch.stack([previous[n].to(current[n].device, torch.float64) for n in names])
        nxt = torch.stack([current[n].to(torch.float64) for n in names])
        summary = spec.delta_summary(prev, nxt, threshold, rank_tol=rank_tol, undefined=undefined)
        for i, name in enumerate(names):
            values = {_SPECTRAL_KEYS[k]: float(summary[k][i]) for k in _SPECTRAL_KEYS if k != "frobenius_norm"}
            values["fro_norm"] = float(summary["delta_frobenius"][i])
            values["relative_fro_norm"] = float(summary["relative_delta_frobenius"][i])
            values["previous_fro_norm"] = float(summary["previous_frobenius"][i])
            out[name] = values
    return out


def pooled_update(per_matrix: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The study's totals over every matrix of an update (5_ranks_updates.py): √Σ‖ΔW‖²,
    √Σ‖ΔW‖² / √Σ‖W_{t−1}‖² (nan when every W_{t−1} is zero) and Σ count above the threshold."""
    update = math.sqrt(sum(v["fro_norm"] ** 2 for v in per_matrix.values()))
    previous = math.sqrt(sum(v["previous_fro_norm"] ** 2 for v in per_matrix.values()))
    return {
        "fro_norm": update,
        "relative_fro_norm": update / previous if previous > 0 else math.nan,
        "count_above": float(sum(v["count_above"] for v in per_matrix.values())),
    }


def spectral_matrices(model: nn.Module, factors: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """``{target: {matrix name: tensor}}``: ``W_native`` (every 2-D native parameter of the block
    matrices, named ``<module>.<parameter>``), ``W`` (effective dense weights; absent for layers
    without one, e.g. CoLA) and, with ``factors``, factor_A / factor_B / ... of every factored layer."""
    out: dict[str, dict[str, torch.Tensor]] = {"W_native": {}, "W": {}}
    for target in target_modules(model):
        for name, param in target.module.named_parameters():
            if param.ndim == 2 and min(param.shape) >= MIN_MATRIX_DIM:
                out["W_native"][f"{target.name}.{name}"] = param.detach()
        W = dense_weight(target.module)
        if W is not None:
            out["W"][target.name] = W
        if factors:
            for key, tensor in layer_factors(target.module).items():
                out.setdefault(key, {})[target.name] = tensor
    return out


def _matrix_layers(model: nn.Module, matrices: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, int]:
    """Layer index of every matrix name (module names and native parameter names)."""
    layers = {}
    for target in target_modules(model):
        layers[target.name] = target.layer
        for name in matrices.get("W_native", {}):
            if name.startswith(target.name + "."):
                layers[name] = target.layer
    return layers


def spectral_rows(
    model: nn.Module,
    previous: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    threshold: float = spec.DEFAULT_THRESHOLD,
    factors: bool = True,
    *,
    rank_tol: float = spec.DEFAULT_RANK_TOL,
    undefined: float = 0.0,
    method: str = "this method",
) -> list[dict[str, Any]]:
    """spectral.csv rows (without the keys): per matrix, the mean over matrices and, for updates,
    the pooled totals, for every target of the module docstring.

    ``previous`` is the previous checkpoint's :func:`spectral_matrices` (its ``W_native`` and
    ``W``), or None at the first checkpoint (no ΔW rows).
    """
    matrices = spectral_matrices(model, factors)
    layers = _matrix_layers(model, matrices)
    summaries: dict[str, dict[str, dict[str, float]]] = {}
    for target, mats in matrices.items():
        if mats:
            summaries[target] = _summaries(mats, threshold, rank_tol, undefined)
        if previous is not None and target in UPDATE_TARGETS and mats:
            summaries[UPDATE_TARGETS[target]] = _delta_summaries(previous.get(target, {}), mats, threshold, rank_tol, undefined)
    rows: list[dict[str, Any]] = []
    order = ["W_native", "dW_native", "W", "dW"] + sorted(t for t in summaries if t not in ("W_native", "dW_native", "W", "dW"))
    for target in order:
        per_matrix = summaries.get(target)
        if not per_matrix:
            if target in ("W", "dW") and not matrices["W"] and (target == "W" or previous is not None):
                rows += _not_applicable(target, NO_DENSE.format(method=method))
            continue
        names = [n for n in layers if n in per_matrix]
        metrics = [m for m in per_matrix[names[0]] if m != "previous_fro_norm"]
        for name in names:
            rows += [_row(target, name, layers[name], metric, per_matrix[name][metric]) for metric in metrics]
        for metric in metrics:
            rows.append(_row(target, "mean", -1, metric, float(np.mean([per_matrix[n][metric] for n in names]))))
        if target in UPDATE_TARGETS.values():
            rows += [_row(target, "pooled", -1, metric, value) for metric, value in pooled_update(per_matrix).items()]
    return rows


def _row(target: str, matrix: str, layer: int, metric: str, value: float) -> dict[str, Any]:
    return {"target": target, "matrix": matrix, "layer": layer, "metric": metric, "value": value, "applicable": True, "reason": ""}


def _not_applicable(target: str, reason: str) -> list[dict[str, Any]]:
    metrics = list(_SPECTRAL_KEYS.values()) + (["relative_fro_norm"] if target == "dW" else [])
    return [{**_row(target, "mean", -1, metric, math.nan), "applicable": False, "reason": reason} for metric in metrics]


class SpectralStage(Stage):
    table = TableSpec("spectral", KEY_COLUMNS + ["target", "matrix", "layer", "metric", "value", "applicable", "reason"])

    def plan(self, step: int, steps: Sequence[int]) -> list[Item]:
        previous = self.run.previous_step(step)
        payload = {"settings": self.settings.family_settings("spectral"), "previous": previous}
        return [Item(step, "spectral", settings_hash(payload), {"previous": previous})]

    def compute(self, item: Item) -> dict[str, Any]:
        s = self.settings
        models = self.context.models
        previous_matrices = None
        previous = item.context["previous"]
        if previous is not None:
            prev_model = models.get(self.run, previous).model
            previous_matrices = {
                target: {n: W.clone() for n, W in mats.items()}
                for target, mats in spectral_matrices(prev_model, factors=False).items()
            }
        loaded = models.get(self.run, item.step)
        rows = spectral_rows(
            loaded.model, previous_matrices, s.spectral_threshold, s.spectral_factors,
            rank_tol=s.rank_tol, undefined=0.0 if s.zero_matrix_gap == "zero" else math.nan, method=self.run.method,
        )
        self.progress.advance(1.0)
        return {"rows": rows, "arrays": {}}
