"""The analysis pipeline: every metric family on every checkpoint of every run.

`rankscope analyze RUN_DIR ... --reference REF` lands here (:func:`analyze_runs`). For each run
and each selected checkpoint step it computes the four families of METRICS.md with the pure
metric functions of this package and writes tidy tables under ``RUN_DIR/analysis/`` in the
format fixed by docs/internals.md ("Analysis outputs").

Work is cut into **items**, one per (checkpoint step, item family, settings hash), e.g.
``landscape:random:all`` at step 200. Each finished item is written atomically to
``analysis/items/step_XXXXXX/<family>-<hash>.json`` and listed in meta.json; a re-run skips
every item whose file exists, and the tables are always rebuilt from the item files, so an
interrupted analysis resumes where it stopped and ends with the same tables as a straight one.

Numerics: a perturbed or interpolated point is written into the model from an fp32 master copy
(θ + α·d, or (1−α)θ_a + αθ_b) every time, never by stepping from the previous point, and the
model is restored from the master afterwards; the α = 0 loss is re-evaluated after each sweep and
must equal the loss before it bit for bit. The probe set is tokenized once and kept on the device
in batches, so one landscape point costs one forward pass over the probe set plus one pass over
the parameters.

Per-family functions (:func:`evaluate_profiles`, :func:`interpolation_curve`,
:func:`spectral_rows`, :func:`similarity_rows`, ...) work on loaded models and can be used
without the run/checkpoint machinery.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rankscope.analysis import AnalysisError
from rankscope.analysis import interpolation as interp
from rankscope.analysis import landscape as land
from rankscope.analysis import spectral as spec
from rankscope.analysis.settings import AnalysisSettings, settings_hash
from rankscope.analysis.similarity import SimilarityAccumulator
from rankscope.errors import CheckpointError
from rankscope.models import LlamaConfig, NotDenseError, TARGET_LINEARS, build_model, dense_state_dict, token_losses

log = logging.getLogger("rankscope.analysis")

KEY_COLUMNS = ["run", "method", "preset", "seed", "step"]
TABLE_COLUMNS: dict[str, list[str]] = {
    "landscape": KEY_COLUMNS + ["direction_set", "k_max", "scope", "metric", "value"],
    "interpolation": KEY_COLUMNS + [
        "kind", "step_a", "step_b", "other_run", "other_method", "space", "applicable", "reason",
        "barrier", "relative_barrier", "loss_a", "loss_b",
    ],
    "spectral": KEY_COLUMNS + ["target", "matrix", "layer", "metric", "value"],
    "similarity": KEY_COLUMNS + ["reference_run", "layer", "metric", "value", "applicable", "reason"],
}
SIMILARITY_METRICS = ("l2", "relative_l2", "cosine", "cka")
LANDSCAPE_METRICS = ("expected_sharpness", "direction_variance", "center_to_min")
PACKED_NOTE = (
    "probe sequences are packed token streams without padding, so every position is real and "
    "mask_padding=true and mask_padding=false give identical numbers"
)
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


# =============================================================================================
# The probe set and the loss on it


class Probe:
    """The tokenized probe set, cut into batches and moved to the device once.

    :meth:`loss` is the exact token-weighted mean next-token loss, with the same arithmetic as
    :func:`rankscope.train.setup.evaluate_loss` (fp64 sum of per-batch fp64 sums, in batch
    order), so both give the same number bit for bit; it only syncs once per call.
    """

    def __init__(
        self,
        sequences: torch.Tensor,
        batch_size: int = 32,
        device: torch.device | str = "cpu",
        mask_padding: bool = True,
    ) -> None:
        if sequences.ndim != 2 or sequences.shape[0] == 0 or sequences.shape[1] < 2:
            raise AnalysisError(f"the probe set must be (n_sequences >= 1, seq_len >= 2) token ids, got {tuple(sequences.shape)}")
        self.sequences = sequences.detach().to("cpu", torch.long)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.mask_padding = mask_padding
        self.batches = [
            self.sequences[start : start + self.batch_size].to(self.device)
            for start in range(0, self.sequences.shape[0], self.batch_size)
        ]
        self.tokens = self.sequences.shape[0] * (self.sequences.shape[1] - 1)
        self.fingerprint = probe_fingerprint(self.sequences)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    @torch.no_grad()
    def loss(self, model: nn.Module) -> float:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for batch in self.batches:
            losses = token_losses(model, batch)
            total += losses.double().sum()
            count += losses.numel()
        return float(total.cpu() / max(count, 1))

    def padding_mask(self, batch: torch.Tensor) -> torch.Tensor | None:
        """Which positions are real tokens (None: no masking).

        Probe sequences are packed from a token stream (documents joined by EOS), so no position
        is padding and the mask is all true; with ``mask_padding=False`` no mask is applied at all,
        as in the study's code. Both give the same numbers here (see meta.json).
        """
        if not self.mask_padding:
            return None
        return torch.ones(batch.shape, dtype=torch.bool, device=batch.device)


def probe_fingerprint(sequences: torch.Tensor) -> str:
    """sha256 over the probe's shape and token ids."""
    data = sequences.detach().to("cpu", torch.int64).contiguous()
    digest = hashlib.sha256(f"{tuple(data.shape)}".encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# =============================================================================================
# Writing points into a model from an fp32 master copy


class ParameterSpace:
    """The floating parameters of ``model`` (frozen ones included, integer buffers never), with
    an fp32 master copy from which every evaluated point is written afresh."""

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None) -> None:
        self.model = model
        params = dict(model.named_parameters())
        wanted = list(params) if names is None else list(names)
        missing = [n for n in wanted if n not in params]
        if missing:
            raise AnalysisError(f"the model has no parameters {missing[:3]}")
        self.params = {n: params[n] for n in wanted if params[n].is_floating_point()}
        with torch.no_grad():
            self.master = {n: p.detach().to(torch.float32).clone() for n, p in self.params.items()}
        self._dirty: set[str] = set()

    @property
    def names(self) -> list[str]:
        return list(self.params)

    def shapes(self, names: Iterable[str] | None = None) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self.master[n].shape) for n in (self.params if names is None else names)}

    @torch.no_grad()
    def set_point(self, alpha: float, direction: Mapping[str, torch.Tensor]) -> None:
        """Write θ + α·d (from the master) into every parameter ``direction`` names; the others
        stay at θ. α = 0 writes the master itself."""
        self.restore(exclude=direction.keys())
        alpha = float(alpha)
        for name, d in direction.items():
            param, master = self.params[name], self.master[name]
            if alpha == 0.0:
                param.copy_(master)
            elif param.dtype == torch.float32:
                torch.add(master, d, alpha=alpha, out=param)
            else:
                param.copy_(torch.add(master, d, alpha=alpha))
            self._dirty.add(name)

    @torch.no_grad()
    def set_values(self, values: Mapping[str, torch.Tensor]) -> None:
        """Write the given tensors (e.g. an interpolated point) into the named parameters."""
        self.restore(exclude=values.keys())
        for name, value in values.items():
            self.params[name].copy_(value)
            self._dirty.add(name)

    @torch.no_grad()
    def restore(self, exclude: Iterable[str] = ()) -> None:
        """Put θ back (bit for bit) into every parameter written since the last restore."""
        keep = set(exclude)
        for name in list(self._dirty):
            if name not in keep:
                self.params[name].copy_(self.master[name])
                self._dirty.discard(name)


# =============================================================================================
# Which parameters / matrices


@dataclass(frozen=True)
class TargetMatrix:
    name: str  # qualified module name, e.g. layers.0.self_attn.q_proj
    layer: int
    module: nn.Module


def target_modules(model: nn.Module) -> list[TargetMatrix]:
    """The attention and MLP projections of every block, whatever module sits there (a method may
    drop one, e.g. CoLA's ungated MLP has no gate_proj)."""
    found = []
    for index, block in enumerate(model.layers):
        for attr in TARGET_LINEARS:
            parent_name = "self_attn" if attr in _ATTENTION else "mlp"
            module = getattr(getattr(block, parent_name), attr, None)
            if module is not None:
                found.append(TargetMatrix(f"layers.{index}.{parent_name}.{attr}", index, module))
    return found


def scope_parameter_names(model: nn.Module, scope: str) -> list[str]:
    """Floating parameters perturbed under a landscape scope: ``all`` (embeddings, head, norms
    included) or ``blocks`` (the attention and MLP matrices and their method-specific tensors)."""
    names = [n for n, p in model.named_parameters() if p.is_floating_point()]
    if scope == "all":
        return names
    if scope == "blocks":
        prefixes = tuple(t.name + "." for t in target_modules(model))
        return [n for n in names if n.startswith(prefixes)]
    raise AnalysisError(f"unknown landscape scope {scope!r}; use all or blocks")


def dense_weight(module: nn.Module) -> torch.Tensor | None:
    """The effective dense weight of a targeted layer (None where it has none, as CoLA)."""
    if callable(getattr(module, "effective_weight", None)):
        with torch.no_grad():
            weight = module.effective_weight()
        return None if weight is None else weight.detach()
    weight = getattr(module, "weight", None)
    return weight.detach() if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None


def layer_factors(module: nn.Module) -> dict[str, torch.Tensor]:
    if callable(getattr(module, "factors", None)):
        with torch.no_grad():
            return {f"factor_{k}": v.detach() for k, v in module.factors().items() if v.ndim == 2}
    return {}


def build_dense_model(model_config: LlamaConfig, state: Mapping[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A plain LlamaModel holding ``state`` (a dense_state_dict)."""
    plain = build_model(model_config)
    plain.load_state_dict(dict(state), strict=True)
    return plain.to(device).eval()


# =============================================================================================
# Landscape


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
    """L(θ + α·d) − L(θ) for every direction and every α of the grid.

    α = 0 is evaluated once before and once after the sweep (not per direction: θ + 0·d is θ);
    the two must agree bit for bit (the model is restored exactly); a mismatch is logged.
    """
    grid = torch.as_tensor(alphas, dtype=torch.float64)
    center = land.grid_center(grid)
    space.restore()
    base = probe.loss(space.model)
    rows = []
    try:
        for direction in directions:
            direction = {n: d.to(probe.device) for n, d in direction.items()}
            losses = np.zeros(grid.numel(), dtype=np.float64)
            for j, alpha in enumerate(grid.tolist()):
                if j == center:
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
    profiles: np.ndarray, alphas: np.ndarray, direction_set: str, scope: str, k_max: int | None = None
) -> list[dict[str, Any]]:
    """The three summary numbers of a set of profiles, as landscape.csv rows (without the keys)."""
    summary = land.profile_summary(torch.as_tensor(profiles), torch.as_tensor(alphas))
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
    space: ParameterSpace, scope_names: Sequence[str], k_max: int, weighted: bool
) -> Iterator[dict[str, torch.Tensor]]:
    weights = {name: space.master[name] for name in scope_names if space.master[name].ndim == 2}
    return land.singular_directions(weights, k_max=k_max, weighted=weighted)


def singular_summary_rows(
    profiles: np.ndarray, alphas: np.ndarray, direction_set: str, scope: str, ks: Sequence[int]
) -> list[dict[str, Any]]:
    rows = []
    for k in ks:
        rows += landscape_summary_rows(profiles[: min(k, profiles.shape[0])], alphas, direction_set, scope, k_max=k)
    return rows


def landscape_family(
    model: nn.Module, probe: Probe, settings: AnalysisSettings | None = None, scope: str = "all"
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Random (and filter-normalized) and singular landscapes of one loaded model: landscape.csv
    rows (without the key columns) and ``{direction_set: profiles}``. Trajectory PCA needs a
    run's checkpoints and is left to the pipeline."""
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
    for direction_set in ["singular"] + (["singular_unweighted"] if s.singular_unweighted else []):
        directions = singular_direction_set(space, names, s.singular_k_max, weighted=direction_set == "singular")
        result = evaluate_profiles(space, probe, directions, land.make_grid(s.grid_points, s.singular_radius))
        rows += singular_summary_rows(result.profiles, result.alphas, direction_set, scope, s.singular_ks)
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


# =============================================================================================
# Interpolation


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


# =============================================================================================
# Spectral


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


# =============================================================================================
# Similarity


@torch.no_grad()
def similarity_rows(model: nn.Module, reference_model: nn.Module, probe: Probe) -> list[dict[str, Any]]:
    """similarity.csv rows (without the keys and reference_run): per layer (0 = embedding output,
    i = block i) L2, relative L2, cosine and linear CKA of the model's hidden states against the
    reference's, accumulated batch by batch over the probe set."""
    accumulators: list[SimilarityAccumulator] | None = None
    for batch in probe.batches:
        _, hidden = model(batch, output_hidden_states=True)
        _, reference_hidden = reference_model(batch, output_hidden_states=True)
        if len(hidden) != len(reference_hidden):
            raise AnalysisError(f"the model has {len(hidden) - 1} blocks but the reference has {len(reference_hidden) - 1}")
        if accumulators is None:
            accumulators = [SimilarityAccumulator() for _ in hidden]
        mask = probe.padding_mask(batch)
        for acc, x, y in zip(accumulators, reference_hidden, hidden):
            acc.update(x.float(), y.float(), mask)
    rows = []
    for layer, acc in enumerate(accumulators or []):
        result = acc.result()
        for metric in SIMILARITY_METRICS:
            rows.append({"layer": layer, "metric": metric, "value": float(result[metric]), "applicable": True, "reason": ""})
    return rows


def similarity_not_applicable(num_layers: int, reason: str) -> list[dict[str, Any]]:
    return [
        {"layer": layer, "metric": metric, "value": float("nan"), "applicable": False, "reason": reason}
        for layer in range(num_layers + 1)
        for metric in SIMILARITY_METRICS
    ]


# =============================================================================================
# Speed measurement (benchmarks/analysis_speed.py and `rankscope bench analysis`)


def measure_point_cost(
    model: nn.Module,
    probe: Probe | torch.Tensor,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Seconds per plain forward over the probe set, per landscape point and per interpolation
    point (each the median of ``repeats`` after a warm-up), their ratios, and the time of the
    parameter writes alone (``landscape_write_s``, ``interpolation_write_s``).

    A landscape point writes θ + α·d from the master and evaluates the probe loss; an
    interpolation point forms (1−α)θ_a + αθ_b afresh and does the same. The model is restored.
    """
    if isinstance(probe, torch.Tensor):
        device = torch.device(device) if device is not None else next(model.parameters()).device
        probe = Probe(probe, batch_size, device)
    device = probe.device
    model.eval()
    space = ParameterSpace(model)
    direction = land.random_direction(space.shapes(), 0, seed, device=device)
    far = {n: space.master[n] + 0.01 * direction[n] for n in space.names}

    def timed(fn: Callable[[], Any]) -> float:
        fn()  # warm-up
        times = []
        for _ in range(max(1, repeats)):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def landscape_point() -> float:
        space.set_point(0.001, direction)
        return probe.loss(model)

    def interpolation_point() -> float:
        space.set_values(interp.interpolate(space.master, far, 0.35))
        return probe.loss(model)

    try:
        forward = timed(lambda: probe.loss(model))
        landscape = timed(landscape_point)
        interpolation = timed(interpolation_point)
        # The writes alone: less noisy than the difference of two forward timings.
        write_direction = timed(lambda: space.set_point(0.001, direction))
        write_interpolated = timed(lambda: space.set_values(interp.interpolate(space.master, far, 0.35)))
    finally:
        space.restore()
    return {
        "device": str(device),
        "parameters": sum(t.numel() for t in space.master.values()),
        "probe_sequences": len(probe),
        "probe_tokens": probe.tokens,
        "batch_size": probe.batch_size,
        "forward_s": forward,
        "landscape_point_s": landscape,
        "interpolation_point_s": interpolation,
        "landscape_ratio": landscape / forward,
        "interpolation_ratio": interpolation / forward,
        "landscape_write_s": write_direction,
        "interpolation_write_s": write_interpolated,
    }


# =============================================================================================
# Runs


@dataclass
class RunInfo:
    path: Path
    name: str
    config: Any  # RunConfig
    checkpoints: list[Any]  # CheckpointInfo, oldest first
    model_config: dict[str, Any]
    data_fingerprint: str | None

    @property
    def method(self) -> str:
        return self.config.method.name

    @property
    def preset(self) -> str:
        return self.config.model.preset

    @property
    def seed(self) -> int:
        return int(self.config.train.seed)

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    def checkpoint(self, step: int):
        return next(c for c in self.checkpoints if c.step == step)

    def previous_step(self, step: int) -> int | None:
        earlier = [s for s in self.steps if s < step]
        return earlier[-1] if earlier else None


def inspect_run(run_dir: str | Path) -> RunInfo:
    """Read a run's config and checkpoint list; raise a one-line error for anything unusable."""
    from rankscope.train import checkpoint as ckpt
    from rankscope.train.setup import read_run_config

    path = Path(run_dir)
    if not path.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist; pass the folder `rankscope train --out` wrote")
    config = read_run_config(path)
    checkpoints = ckpt.intact_checkpoints(path)  # a damaged checkpoint is skipped with a warning naming it
    if not checkpoints:
        raise CheckpointError(
            f"run {run_dir} has no complete checkpoint to analyse; train it with --checkpoint-every or --checkpoint-steps first"
        )
    meta = checkpoints[-1].meta
    return RunInfo(path, path.resolve().name, config, checkpoints, dict(meta.get("model_config") or {}), meta.get("data_fingerprint"))


class _ModelCache:
    """A few loaded models keyed by (run, step), least recently used dropped first."""

    def __init__(self, device: torch.device, size: int = 3) -> None:
        self.device = device
        self.size = size
        self._loaded: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._dense: dict[tuple[str, int], dict[str, torch.Tensor] | str] = {}

    def get(self, run: RunInfo, step: int):
        from rankscope.train.setup import load_run_model

        key = (str(run.path), step)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        loaded = load_run_model(run.path, step, device=self.device)
        self._loaded[key] = loaded
        while len(self._loaded) > self.size:
            old, _ = self._loaded.popitem(last=False)
            self._dense.pop(old, None)
        return loaded

    def dense(self, run: RunInfo, step: int) -> dict[str, torch.Tensor] | str:
        """The run's dense state dict at ``step`` (on the device), or the reason it has none."""
        key = (str(run.path), step)
        if key not in self._dense:
            loaded = self.get(run, step)
            try:
                self._dense[key] = {k: v.detach().clone() for k, v in dense_state_dict(loaded.model).items()}
            except NotDenseError:
                self._dense[key] = f"method {run.method!r} has no dense equivalent (nonlinear factorization)"
        return self._dense[key]


# =============================================================================================
# Progress


class _Progress:
    """A rich bar with ETA on a terminal, plain log lines elsewhere."""

    def __init__(self, label: str, total: float, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.done = 0.0
        self._rich = None
        self._task = None
        self._started = time.perf_counter()

    def __enter__(self) -> "_Progress":
        if self.enabled and sys.stderr.isatty() and self.total > 0:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._rich = Progress(
                TextColumn(f"[bold]analyze {self.label}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False,
            )
            self._rich.__enter__()
            self._task = self._rich.add_task("analyze", total=self.total, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def advance(self, amount: float, info: str = "") -> None:
        self.done += amount
        if self._rich is not None:
            self._rich.update(self._task, advance=amount, info=info)

    def item_done(self, info: str, seconds: float) -> None:
        if self._rich is None and self.enabled:
            log.info("%s: %s done in %.1f s (%.0f%%)", self.label, info, seconds, 100.0 * self.done / max(self.total, 1e-9))


# =============================================================================================
# Items: planning, computing, storing


@dataclass
class Item:
    step: int
    family: str  # landscape:<set>:<scope> | interpolation:ccbh | interpolation:imbh:<other> | spectral | similarity
    digest: str
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"step_{self.step:06d}/{self.family}/{self.digest}"

    def path(self, analysis_dir: Path) -> Path:
        safe = self.family.replace(":", "__").replace("/", "_")
        return analysis_dir / "items" / f"step_{self.step:06d}" / f"{safe}-{self.digest}.json"

    @property
    def table(self) -> str:
        return self.family.split(":")[0]


def _write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=None, allow_nan=True))
    os.replace(tmp, path)


def _landscape_sets(settings: AnalysisSettings) -> list[str]:
    sets = ["random"]
    if settings.filter_normalized:
        sets.append("random_filter")
    sets.append("singular")
    if settings.singular_unweighted:
        sets.append("singular_unweighted")
    sets.append("trajectory_pca")
    return sets


@dataclass
class _Study:
    """Everything shared by the runs of one `analyze_runs` call."""

    settings: AnalysisSettings
    reference: RunInfo
    runs: list[RunInfo]
    probe: Probe
    models: _ModelCache
    show_progress: bool
    warnings: list[str]
    pair_curves: dict[tuple[str, str, int], tuple[np.ndarray | None, str]] = field(default_factory=dict)

    def others(self, run: RunInfo) -> list[RunInfo]:
        """IMBH partners: the reference, then every other given run with the same preset and seed."""
        partners = [self.reference]
        seen = {self.reference.path.resolve()}
        for other in self.runs:
            if other.path.resolve() in seen or other.path.resolve() == run.path.resolve():
                continue
            if other.preset == run.preset and other.seed == run.seed:
                partners.append(other)
                seen.add(other.path.resolve())
        return partners


def plan_items(run: RunInfo, study: _Study, steps: Sequence[int]) -> list[Item]:
    """Every item of ``run`` at ``steps`` under the current settings, in table order."""
    s = study.settings
    probe_fp = study.probe.fingerprint
    items: list[Item] = []
    for step in steps:
        previous = run.previous_step(step)
        if "landscape" in s.metrics:
            for direction_set in _landscape_sets(s):
                for scope in s.scopes:
                    family = f"landscape:{direction_set}:{scope}"
                    payload = {"settings": s.family_settings(family), "probe": probe_fp}
                    if direction_set == "trajectory_pca":
                        payload["checkpoints"] = run.steps
                    items.append(Item(step, family, settings_hash(payload), {"direction_set": direction_set, "scope": scope}))
        if "interpolation" in s.metrics:
            base = {"settings": s.family_settings("interpolation"), "probe": probe_fp}
            if previous is not None:
                items.append(Item(step, "interpolation:ccbh", settings_hash({**base, "previous": previous}), {"previous": previous}))
            imbh_here = s.imbh_every_checkpoint or step == max(steps)
            for other in (study.others(run) if imbh_here else []):
                payload = {**base, "other": str(other.path.resolve())}
                items.append(Item(step, f"interpolation:imbh:{other.name}", settings_hash(payload), {"other": other}))
        if "spectral" in s.metrics:
            payload = {"settings": s.family_settings("spectral"), "previous": previous}
            items.append(Item(step, "spectral", settings_hash(payload), {"previous": previous}))
        if "similarity" in s.metrics:
            payload = {"settings": s.family_settings("similarity"), "probe": probe_fp, "reference": str(study.reference.path.resolve())}
            items.append(Item(step, "similarity", settings_hash(payload)))
    return items


class _RunAnalysis:
    """Computes the pending items of one run."""

    def __init__(self, run: RunInfo, study: _Study, progress: _Progress) -> None:
        self.run, self.study, self.progress = run, study, progress
        self.settings = study.settings
        self.probe = study.probe
        self._spaces: dict[tuple[int, str], tuple[ParameterSpace, str]] = {}
        self._trajectory: dict[str, tuple[list[dict[str, torch.Tensor]], list[float]] | str] = {}

    # -- the model a landscape perturbs ----------------------------------------------------------

    def space(self, step: int) -> tuple[ParameterSpace, str]:
        """The parameter space perturbed at ``step`` and a note on which space it is."""
        key = (step, self.settings.space)
        if key not in self._spaces:
            self._spaces.clear()  # one step at a time
            loaded = self.study.models.get(self.run, step)
            if self.settings.space == "dense":
                dense = self.study.models.dense(self.run, step)
                if isinstance(dense, str):
                    self._spaces[key] = (ParameterSpace(loaded.model), f"native ({dense})")
                else:
                    self._spaces[key] = (ParameterSpace(build_dense_model(loaded.model_config, dense, self.probe.device)), "dense")
            else:
                self._spaces[key] = (ParameterSpace(loaded.model), "native")
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

    # -- items ------------------------------------------------------------------------------------

    def compute(self, item: Item) -> dict[str, Any]:
        handler = {
            "landscape": self._landscape, "interpolation": self._interpolation,
            "spectral": self._spectral, "similarity": self._similarity,
        }[item.table]
        return handler(item)

    def _landscape(self, item: Item) -> dict[str, Any]:
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
        if direction_set in ("random", "random_filter"):
            count = s.directions
            directions = random_direction_set(space, names, count, s.direction_seed, direction_set == "random_filter", device)
            alphas = land.make_grid(s.grid_points, s.random_radius)
        elif direction_set in ("singular", "singular_unweighted"):
            count = s.singular_k_max
            directions = singular_direction_set(space, names, count, weighted=direction_set == "singular")
            alphas = land.make_grid(s.grid_points, s.singular_radius)
        else:
            directions, explained = trajectory  # type: ignore[misc]
            count = len(directions)
            alphas = land.make_grid(s.grid_points, 1.0)
            notes["explained_variance_ratio"] = explained
        result = evaluate_profiles(space, self.probe, directions, alphas, on_direction=lambda: self.progress.advance(1.0 / count))
        if direction_set.startswith("singular"):
            rows = singular_summary_rows(result.profiles, result.alphas, direction_set, scope, s.singular_ks)
        else:
            rows = landscape_summary_rows(result.profiles, result.alphas, direction_set, scope)
        key = f"{direction_set}/{scope}/step_{item.step:06d}"
        return {
            "rows": rows,
            "arrays": {key: result.profiles.tolist(), f"alphas/{direction_set}": result.alphas.tolist()},
            "base_loss": result.base_loss, "center_loss_after_sweep": result.center_loss_after, "notes": notes,
        }

    def _interpolation(self, item: Item) -> dict[str, Any]:
        from rankscope.train import checkpoint as ckpt

        n_points = self.settings.interpolation_points
        step = item.step
        self.progress.advance(1.0)
        if item.family == "interpolation:ccbh":
            previous = item.context["previous"]
            head = {"kind": "ccbh", "step_a": previous, "step_b": step, "other_run": "", "other_method": "", "space": "native"}
            loaded = self.study.models.get(self.run, step)
            state = ckpt.load_model_state(self.run.checkpoint(previous).path)
            try:
                curve = ccbh_curve(loaded.model, state, self.probe, n_points)
            except AnalysisError as exc:
                return {"rows": [{**head, **not_applicable_row(str(exc))}], "arrays": {}}
            return {"rows": [{**head, **barrier_row(curve)}], "arrays": {f"ccbh//step_{step:06d}": curve.tolist()}}

        other: RunInfo = item.context["other"]
        head = {"kind": "imbh", "step_a": step, "step_b": step, "other_run": other.name, "other_method": other.method, "space": "dense"}
        curve, reason = self._pair_curve(other, step)
        if curve is None:
            return {"rows": [{**head, **not_applicable_row(reason)}], "arrays": {}}
        return {"rows": [{**head, **barrier_row(curve)}], "arrays": {f"imbh/{other.name}/step_{step:06d}": curve.tolist()}}

    def _pair_curve(self, other: RunInfo, step: int) -> tuple[np.ndarray | None, str]:
        """The IMBH curve from this run to ``other`` at ``step``, shared with the reverse pair."""
        here, there = str(self.run.path.resolve()), str(other.path.resolve())
        cache = self.study.pair_curves
        if (there, here, step) in cache:  # computed from the other side: same path reversed
            curve, reason = cache[(there, here, step)]
            return (None if curve is None else curve[::-1].copy()), reason
        if (here, there, step) not in cache:
            cache[(here, there, step)] = self._compute_pair(other, step)
        return cache[(here, there, step)]

    def _compute_pair(self, other: RunInfo, step: int) -> tuple[np.ndarray | None, str]:
        if other.path.resolve() == self.run.path.resolve():
            # A run against itself (the reference's own row): every point is the same model.
            loss = self.probe.loss(self.study.models.get(self.run, step).model)
            return np.full(self.settings.interpolation_points, loss), ""
        if step not in other.steps:
            return None, f"run {other.name} has no checkpoint at step {step} (it has {other.steps})"
        if other.model_config != self.run.model_config:
            return None, f"run {other.name} has another model shape"
        dense_a = self.study.models.dense(self.run, step)
        if isinstance(dense_a, str):
            return None, dense_a
        dense_b = self.study.models.dense(other, step)
        if isinstance(dense_b, str):
            return None, f"{other.name}: {dense_b}"
        loaded = self.study.models.get(self.run, step)
        return imbh_curve(dense_a, dense_b, loaded.model_config, self.probe, self.settings.interpolation_points), ""

    def _spectral(self, item: Item) -> dict[str, Any]:
        loaded = self.study.models.get(self.run, item.step)
        previous_weights = None
        previous = item.context["previous"]
        if previous is not None:
            prev_loaded = self.study.models.get(self.run, previous)
            previous_weights = {n: W.clone() for n, W in spectral_matrices(prev_loaded.model, factors=False)["W"].items()}
            loaded = self.study.models.get(self.run, item.step)  # keep it the most recent entry
        rows = spectral_rows(loaded.model, previous_weights, self.settings.spectral_threshold, self.settings.spectral_factors)
        self.progress.advance(1.0)
        return {"rows": rows, "arrays": {}}

    def _similarity(self, item: Item) -> dict[str, Any]:
        reference = self.study.reference
        self.progress.advance(1.0)
        head = {"reference_run": reference.name}
        num_layers = int(self.run.model_config.get("num_layers", 0))
        if item.step not in reference.steps:
            reason = f"reference {reference.name} has no checkpoint at step {item.step} (it has {reference.steps})"
            return {"rows": [{**head, **row} for row in similarity_not_applicable(num_layers, reason)], "arrays": {}}
        loaded = self.study.models.get(self.run, item.step)
        reference_loaded = self.study.models.get(reference, item.step)
        rows = similarity_rows(loaded.model, reference_loaded.model, self.probe)
        return {"rows": [{**head, **row} for row in rows], "arrays": {}}


# =============================================================================================
# Tables


def _write_tables(run: RunInfo, study: _Study, analysis_dir: Path) -> dict[str, Any]:
    """Rebuild every table, the npz files and meta.json from the finished item files."""
    import pandas as pd

    items = plan_items(run, study, run.steps)  # every checkpoint: earlier calls may have done other steps
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLE_COLUMNS}
    arrays: dict[str, dict[str, np.ndarray]] = {"landscape": {}, "interpolation": {}}
    finished, not_applicable, base_losses, notes = [], {}, {}, {}
    keys = {"run": run.name, "method": run.method, "preset": run.preset, "seed": run.seed}
    for item in items:
        path = item.path(analysis_dir)
        if not path.is_file():
            continue
        payload = json.loads(path.read_text())
        finished.append(item.key)
        for row in payload["rows"]:
            rows[item.table].append({**keys, "step": item.step, **row})
        if item.table in arrays:
            for name, values in payload["arrays"].items():
                arrays[item.table][name] = np.asarray(values, dtype=np.float64)
        if payload.get("not_applicable"):
            not_applicable[item.family] = payload["not_applicable"]
        if "base_loss" in payload:
            base_losses[str(item.step)] = payload["base_loss"]
        if payload.get("notes"):
            notes[item.key] = payload["notes"]

    for table in study.settings.metrics:
        frame = pd.DataFrame(rows[table], columns=TABLE_COLUMNS[table])
        if table == "landscape":
            frame["k_max"] = frame["k_max"].astype("Int64")
        _write_csv_atomic(frame, analysis_dir / f"{table}.csv")
    for table, filename in (("landscape", "landscape_profiles.npz"), ("interpolation", "interpolation_curves.npz")):
        if table in study.settings.metrics:
            _write_npz_atomic(arrays[table], analysis_dir / filename)

    s = study.settings
    meta = {
        "run": run.name, "run_dir": str(run.path.resolve()), "method": run.method, "preset": run.preset, "seed": run.seed,
        "reference_run": study.reference.name, "reference_dir": str(study.reference.path.resolve()),
        "reference_method": study.reference.method,
        "settings": s.to_dict(),
        "probe": {
            "fingerprint": study.probe.fingerprint, "sequences": len(study.probe),
            "seq_len": int(study.probe.sequences.shape[1]), "tokens": study.probe.tokens,
            "data_fingerprint": run.data_fingerprint, "packed": True,
        },
        "mask_padding": s.mask_padding, "mask_padding_note": PACKED_NOTE,
        "grids": {
            "random": land.make_grid(s.grid_points, s.random_radius).tolist(),
            "singular": land.make_grid(s.grid_points, s.singular_radius).tolist(),
            "trajectory_pca": land.make_grid(s.grid_points, 1.0).tolist(),
            "interpolation": interp.interpolation_alphas(s.interpolation_points).tolist(),
        },
        "grid_notes": {
            "trajectory_pca": "directions scaled so that alpha = +-1 reaches the farthest checkpoint along each component",
        },
        "directions": {
            "random": s.directions, "singular_k_max": s.singular_k_max, "singular_ks": list(s.singular_ks),
            "trajectory_components": s.trajectory_components, "seed": s.direction_seed,
        },
        "scopes": list(s.scopes), "space": s.space,
        "imbh_partners": [o.name for o in study.others(run)],
        "base_losses": base_losses,
        "not_applicable": not_applicable,
        "notes": notes,
        "warnings": study.warnings,
        "finished": finished,
    }
    _write_json_atomic(analysis_dir / "meta.json", meta)
    return meta


def _write_csv_atomic(frame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _write_npz_atomic(arrays: Mapping[str, np.ndarray], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


# =============================================================================================
# Entry point


def _load_probe(run: RunInfo, probe_size: int | None, cache: dict[str, tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, str]:
    """The run's probe sequences (first ``probe_size`` of them) and its data fingerprint."""
    import dataclasses

    from rankscope.data import prepare_data

    data_cfg = run.config.data
    key = json.dumps(dataclasses.asdict(data_cfg), sort_keys=True, default=str)
    if key not in cache:
        prepared = prepare_data(data_cfg)
        cache[key] = (prepared.probe, prepared.fingerprint)
    probe, fingerprint = cache[key]
    if probe_size is not None:
        if probe_size > probe.shape[0]:
            raise AnalysisError(
                f"--probe-size {probe_size} exceeds the {probe.shape[0]} probe sequences of run {run.name}; "
                f"lower --probe-size or train with --set data.probe_sequences={probe_size}"
            )
        probe = probe[:probe_size]
    return probe, fingerprint


def _check_inputs(runs: list[RunInfo], reference: RunInfo, settings: AnalysisSettings) -> list[str]:
    names: dict[str, Path] = {}
    for run in runs:
        if run.name in names and names[run.name].resolve() != run.path.resolve():
            raise AnalysisError(f"two runs are both named {run.name!r} ({names[run.name]} and {run.path}); rename one folder")
        names[run.name] = run.path
        if settings.steps is not None:
            missing = [s for s in settings.steps if s not in run.steps]
            if missing:
                raise AnalysisError(f"run {run.name} has no checkpoint at steps {missing}; available steps: {run.steps}")
        if run.model_config != reference.model_config:
            differing = sorted(k for k in set(run.model_config) | set(reference.model_config)
                               if run.model_config.get(k) != reference.model_config.get(k))
            detail = ", ".join(f"{k} {run.model_config.get(k)} vs {reference.model_config.get(k)}" for k in differing[:3])
            raise AnalysisError(
                f"reference {reference.name} has another model shape than run {run.name} ({detail}); "
                "pass a reference of the same preset and overrides"
            )
    warnings = []
    if reference.method != "full":
        warnings.append(f"reference {reference.name} was trained with method {reference.method!r}, not full-rank")
    return warnings


def analyze_runs(
    run_dirs: Sequence[str | Path],
    reference: str | Path,
    settings: AnalysisSettings | None = None,
    *,
    progress: bool = True,
) -> dict[str, Path]:
    """Analyse every selected checkpoint of every run; returns ``{run name: RUN_DIR/analysis}``.

    Everything that can be checked without computing (runs with checkpoints, requested steps,
    model shapes, the probe set) is checked first, so bad input fails in seconds.
    """
    from rankscope.train.setup import resolve_device

    settings = settings or AnalysisSettings()
    settings.validate()
    if not run_dirs:
        raise AnalysisError("no run folders given; pass at least one RUN_DIR")
    runs = [inspect_run(path) for path in run_dirs]
    reference_run = inspect_run(reference)
    warnings = _check_inputs(runs, reference_run, settings)

    probes: dict[str, tuple[torch.Tensor, str]] = {}
    reference_probe, reference_data = _load_probe(reference_run, settings.probe_size, probes)
    for run in runs:
        probe, data_fingerprint = _load_probe(run, settings.probe_size, probes)
        if probe.shape != reference_probe.shape or not torch.equal(probe, reference_probe):
            raise AnalysisError(
                f"run {run.name} and reference {reference_run.name} have different probe sets (data config or "
                "tokenizer differ); analyse runs trained on the same data against a reference of that data"
            )
        if data_fingerprint != reference_data:
            warnings.append(f"run {run.name} was trained on other data than the reference (same probe set)")
    for message in warnings:
        log.warning(message)

    device = resolve_device(settings.device)
    probe = Probe(reference_probe, settings.batch_size, device, settings.mask_padding)
    study = _Study(settings, reference_run, runs, probe, _ModelCache(device, size=4), progress, warnings)

    outputs: dict[str, Path] = {}
    for run in runs:
        outputs[run.name] = _analyze_one(run, study)
    return outputs


def _analyze_one(run: RunInfo, study: _Study) -> Path:
    settings = study.settings
    analysis_dir = run.path / "analysis"
    analysis_dir.mkdir(parents=True, exist_ok=True)
    steps = list(settings.steps) if settings.steps is not None else run.steps
    items = plan_items(run, study, steps)
    pending = [item for item in items if not item.path(analysis_dir).is_file()]
    log.info("%s: %d of %d analysis items to compute (%d checkpoints)", run.name, len(pending), len(items), len(steps))
    worker = _RunAnalysis(run, study, _Progress(run.name, 0))
    with _Progress(run.name, float(len(pending)), enabled=study.show_progress) as bar:
        worker.progress = bar
        for item in pending:
            started = time.perf_counter()
            before = bar.done
            payload = worker.compute(item)
            bar.advance(max(0.0, 1.0 - (bar.done - before)))  # top up to exactly one unit per item
            payload.update(key=item.key, family=item.family, step=item.step, run=run.name)
            _write_json_atomic(item.path(analysis_dir), payload)
            bar.item_done(f"step {item.step} {item.family}", time.perf_counter() - started)
    _write_tables(run, study, analysis_dir)
    return analysis_dir
