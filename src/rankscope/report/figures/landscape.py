"""1-D loss-landscape figures: profiles at a few checkpoints and the summaries (expected sharpness,
direction variance) vs step, for random and singular direction sets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from rankscope.report.collect import Study, load_profiles, sorted_methods
from rankscope.report.figures.base import (
    FigureResult,
    _mean_band,
    _method_legend,
    _new_figure,
    _no_data,
    _pick_checkpoints,
    _preset_runs,
    _save,
    _seed_note,
    _step_axis,
    _step_label,
    _table,
)


class ProfileCache:
    """landscape_profiles.npz per run, loaded once per report."""

    def __init__(self, study: Study):
        self.study = study
        self._loaded: dict[str, dict[str, np.ndarray]] = {}

    def get(self, run: str) -> dict[str, np.ndarray]:
        if run not in self._loaded:
            self._loaded[run] = load_profiles(self.study.run_dir(run))
        return self._loaded[run]


def _profile_steps(arrays: dict[str, np.ndarray], direction_set: str, scope: str) -> dict[int, str]:
    prefix = f"{direction_set}/{scope}/step_"
    steps = {}
    for key in arrays:
        if key.startswith(prefix) and key[len(prefix):].isdigit():
            steps[int(key[len(prefix):])] = key
    return steps


def _landscape_scope(landscape: pd.DataFrame | None, profiles: ProfileCache, runs: Sequence[str], direction_set: str) -> str:
    if landscape is not None and "scope" in landscape.columns:
        scopes = landscape.loc[landscape["direction_set"] == direction_set, "scope"].dropna().astype(str).unique()
        if len(scopes):
            return "all" if "all" in scopes else sorted(scopes)[0]
    for run in runs:
        for key in profiles.get(run):
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == direction_set:
                return parts[1]
    return "all"


def _collect_profiles(study: Study, preset: str, direction_set: str, scope: str, profiles: ProfileCache,
                      k_values: Sequence[int | None]) -> pd.DataFrame:
    """Long table: method, seed, step, k, alpha, value — each run's profile averaged over its
    directions (or over the first k singular directions)."""
    rows = []
    for run in _preset_runs(study, preset).itertuples(index=False):
        arrays = profiles.get(run.run)
        alphas = arrays.get(f"alphas/{direction_set}")
        if alphas is None:
            continue
        for step, key in _profile_steps(arrays, direction_set, scope).items():
            matrix = np.atleast_2d(np.asarray(arrays[key], dtype=float))
            if matrix.shape[-1] != alphas.shape[0]:
                continue
            for k in k_values:
                if k is not None and matrix.shape[0] < k:
                    continue
                curve = matrix[: k or matrix.shape[0]].mean(axis=0)
                rows.extend({"method": run.method, "seed": run.seed, "run": run.run, "step": step, "k": k or 0,
                             "alpha": float(a), "value": float(v)} for a, v in zip(alphas, curve))
    return pd.DataFrame(rows, columns=["method", "seed", "run", "step", "k", "alpha", "value"])


def _draw_profile_row(axes, profile_table: pd.DataFrame, checkpoints: Sequence[int], methods: Sequence[str],
                      row_label: str) -> None:
    for column, (ax, step) in enumerate(zip(axes, checkpoints)):
        at_step = profile_table[profile_table["step"] == step]
        if at_step.empty:
            _no_data(ax, f"no profile at step {_step_label(step)}")
        else:
            _mean_band(ax, at_step, "alpha", "value", methods)
            ax.axvline(0.0, color="#999999", linewidth=0.6, zorder=1)
        ax.set_title(f"step {_step_label(step)}")
        ax.set_xlabel("α (step along direction)")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
        if column == 0:
            ax.set_ylabel(f"{row_label}\nL(θ+αd) − L(θ) [nats]")


def _summary_vs_step(ax, landscape: pd.DataFrame, direction_set: str, scope: str, metric: str, methods: Sequence[str],
                     k_max: int | None, ylabel: str) -> None:
    rows = landscape[(landscape["direction_set"] == direction_set) & (landscape["metric"] == metric)]
    if "scope" in rows.columns:
        rows = rows[rows["scope"].astype(str) == scope]
    if k_max is not None and "k_max" in rows.columns:
        rows = rows[pd.to_numeric(rows["k_max"], errors="coerce") == k_max]
    if rows.empty:
        _no_data(ax, f"no {metric.replace('_', ' ')} rows")
        return
    _mean_band(ax, rows, "step", "value", methods, marker="o")
    _step_axis(ax)
    ax.set_ylabel(ylabel)


def fig_landscape_random(study: Study, preset: str, out_dir: Path, profiles: ProfileCache,
                         direction_set: str = "random", **_) -> FigureResult:
    name = f"landscape_{direction_set}_{preset}"
    title = f"1-D loss landscape along {direction_set.replace('_', ' ')} directions ({preset})"
    landscape = _table(study, "landscape", preset)
    runs = _preset_runs(study, preset)["run"].tolist()
    scope = _landscape_scope(landscape, profiles, runs, direction_set)
    curves = _collect_profiles(study, preset, direction_set, scope, profiles, [None])
    has_summary = landscape is not None and (landscape["direction_set"] == direction_set).any()
    if curves.empty and not has_summary:
        return FigureResult(name, title, skipped=f"no {direction_set} landscape profiles or rows for preset {preset}")
    methods = sorted_methods(set(curves["method"]) | (set(landscape.loc[landscape["direction_set"] == direction_set, "method"])
                                                     if has_summary else set()))
    checkpoints = _pick_checkpoints(curves["step"].unique()) if not curves.empty else []
    figure = _new_figure(3.0 * max(len(checkpoints), 3) + 1.6, 7.2)
    top, bottom = figure.subfigures(2, 1, height_ratios=[1.0, 1.05])
    if checkpoints:
        axes = np.atleast_1d(top.subplots(1, len(checkpoints), sharey=True))
        _draw_profile_row(axes, curves, checkpoints, methods, "mean over directions")
        top.suptitle(f"profile averaged over directions, at {len(checkpoints)} checkpoints", fontsize=10)
    else:
        _no_data(top.subplots(), "no landscape_profiles.npz for these runs")
    es_ax, dv_ax = bottom.subplots(1, 2)
    if has_summary:
        _summary_vs_step(es_ax, landscape, direction_set, scope, "expected_sharpness", methods, None,
                         "expected sharpness [nats]")
        _summary_vs_step(dv_ax, landscape, direction_set, scope, "direction_variance", methods, None,
                         "direction variance [nats²]")
    else:
        _no_data(es_ax, "no landscape.csv rows")
        _no_data(dv_ax, "no landscape.csv rows")
    es_ax.set_title("expected sharpness vs step")
    dv_ax.set_title("direction variance vs step")
    _method_legend(figure, methods)
    figure.suptitle(f"{title} — parameter scope: {scope}")
    caption = (f"Top: L(θ+αd) − L(θ) averaged over the {direction_set} directions at up to five checkpoints "
               f"(each method perturbs its own native parameters). Bottom: expected sharpness and direction "
               f"variance vs step (METRICS.md §1).") + _seed_note(curves if not curves.empty else landscape)
    return FigureResult(name, title, caption, _save(figure, out_dir, name))


def _singular_k_values(landscape: pd.DataFrame | None, direction_set: str) -> list[int]:
    if landscape is not None and "k_max" in landscape.columns:
        values = pd.to_numeric(landscape.loc[landscape["direction_set"] == direction_set, "k_max"], errors="coerce")
        values = sorted(int(v) for v in values.dropna().unique())
        if values:
            return values
    return [1, 5, 10, 20]


def fig_landscape_singular(study: Study, preset: str, out_dir: Path, profiles: ProfileCache,
                           direction_set: str = "singular", **_) -> list[FigureResult]:
    """Two figures: the profile grid (rows: top-K, columns: checkpoints) and the summaries per K."""
    label = direction_set.replace("_", " ")
    landscape = _table(study, "landscape", preset)
    runs = _preset_runs(study, preset)["run"].tolist()
    scope = _landscape_scope(landscape, profiles, runs, direction_set)
    k_values = _singular_k_values(landscape, direction_set)
    curves = _collect_profiles(study, preset, direction_set, scope, profiles, k_values)
    has_summary = landscape is not None and (landscape["direction_set"] == direction_set).any()
    methods = sorted_methods(set(curves["method"]) | (set(landscape.loc[landscape["direction_set"] == direction_set, "method"])
                                                     if has_summary else set()))
    results = []

    name = f"landscape_{direction_set}_profiles_{preset}"
    title = f"1-D loss landscape along top-K {label} directions ({preset})"
    if curves.empty:
        results.append(FigureResult(name, title, skipped=f"no {direction_set} profiles in landscape_profiles.npz for preset {preset}"))
    else:
        checkpoints = _pick_checkpoints(curves["step"].unique())
        shown_k = [k for k in k_values if (curves["k"] == k).any()]
        figure = _new_figure(3.0 * max(len(checkpoints), 3) + 1.6, 2.5 * len(shown_k) + 0.8)
        axes = np.atleast_2d(figure.subplots(len(shown_k), len(checkpoints), sharey="row", squeeze=False))
        for row, k in enumerate(shown_k):
            _draw_profile_row(axes[row], curves[curves["k"] == k], checkpoints, methods, f"top-{k}")
            if row < len(shown_k) - 1:
                for ax in axes[row]:
                    ax.set_xlabel("")
        _method_legend(figure, methods)
        figure.suptitle(f"{title} — parameter scope: {scope}")
        caption = (f"Row K: L(θ+α·d_k) − L(θ) averaged over the singular directions d_k = σ_k u_k v_kᵀ, k ≤ K, "
                   f"at up to five checkpoints.") + _seed_note(curves)
        results.append(FigureResult(name, title, caption, _save(figure, out_dir, name)))

    name = f"landscape_{direction_set}_summary_{preset}"
    title = f"Sharpness and direction variance along top-K {label} directions ({preset})"
    if not has_summary:
        results.append(FigureResult(name, title, skipped=f"no {direction_set} rows in landscape.csv for preset {preset}"))
        return results
    figure = _new_figure(3.1 * len(k_values) + 1.6, 5.8)
    axes = np.atleast_2d(figure.subplots(2, len(k_values), squeeze=False))
    for column, k in enumerate(k_values):
        _summary_vs_step(axes[0, column], landscape, direction_set, scope, "expected_sharpness", methods, k,
                         "expected sharpness [nats]" if column == 0 else "")
        axes[0, column].set_title(f"top-{k}: expected sharpness")
        axes[0, column].set_xlabel("")
        if k == 1:
            _no_data(axes[1, column], "direction variance is 0 for K = 1")
        else:
            # The y label goes on the first panel of the row that has axes (K = 1 has none).
            first = column == 0 or (column == 1 and k_values[0] == 1)
            _summary_vs_step(axes[1, column], landscape, direction_set, scope, "direction_variance", methods, k,
                             "direction variance [nats²]" if first else "")
        axes[1, column].set_title(f"top-{k}: direction variance")
    _method_legend(figure, methods)
    figure.suptitle(f"{title} — parameter scope: {scope}")
    caption = "Expected sharpness (top row) and across-component direction variance (bottom row) vs step, per K." \
        + _seed_note(landscape[landscape["direction_set"] == direction_set])
    results.append(FigureResult(name, title, caption, _save(figure, out_dir, name)))
    return results


def landscape_direction_sets(study: Study, preset: str, profiles: ProfileCache) -> list[str]:
    sets: set[str] = set()
    table = _table(study, "landscape", preset)
    if table is not None:
        sets |= set(table["direction_set"].dropna().astype(str))
    for run in _preset_runs(study, preset)["run"]:
        sets |= {key.split("/")[1] for key in profiles.get(run) if key.startswith("alphas/")}
    order = ["random", "random_filter", "singular", "singular_unweighted", "trajectory_pca"]
    return sorted(sets, key=lambda s: (order.index(s) if s in order else len(order), s))
