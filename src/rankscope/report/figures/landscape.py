"""1-D loss-landscape figures: profiles at a few checkpoints and the summaries (expected sharpness,
direction variance) vs step, for random and singular direction sets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from rankscope.report.collect import Study, load_profiles, sorted_methods
from rankscope.report.figures import style
from rankscope.report.figures.base import (
    FigureResult,
    draw_rows,
    mean_band,
    method_legend,
    method_rows,
    no_data,
    pick_checkpoints,
    preset_runs,
    preset_table,
    reference_legend,
    rows_height,
    save_figure,
    seed_note,
    single_valued,
    step_axis,
    step_label,
)

SMALL_MULTIPLES_NOTE = (" One row per method, full rank (near-black) in every panel, axes shared per column; profiles "
                        "at the last checkpoint only (the summaries give the trend over steps).")


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
    for run in preset_runs(study, preset).itertuples(index=False):
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
            no_data(ax, f"no profile at step {step_label(step)}")
        else:
            mean_band(ax, at_step, "alpha", "value", methods)
            ax.axvline(0.0, color="#999999", linewidth=0.6, zorder=1)
        ax.set_title(f"step {step_label(step)}")
        ax.set_xlabel("α (step along direction)")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
        if column == 0:
            ax.set_ylabel(f"{row_label}\nL(θ+αd) − L(θ) [nats]")


def _summary_rows(landscape: pd.DataFrame, direction_set: str, scope: str, metric: str, k_max: int | None) -> pd.DataFrame:
    rows = landscape[(landscape["direction_set"] == direction_set) & (landscape["metric"] == metric)]
    if "scope" in rows.columns:
        rows = rows[rows["scope"].astype(str) == scope]
    if k_max is not None and "k_max" in rows.columns:
        rows = rows[pd.to_numeric(rows["k_max"], errors="coerce") == k_max]
    return rows


ONE_STEP = "one checkpoint per run: no trend over steps to draw"


def _summary_vs_step(ax, landscape: pd.DataFrame, direction_set: str, scope: str, metric: str, methods: Sequence[str],
                     k_max: int | None, ylabel: str) -> None:
    rows = _summary_rows(landscape, direction_set, scope, metric, k_max)
    if rows.empty:
        no_data(ax, f"no {metric.replace('_', ' ')} rows")
        return
    if single_valued(rows, "step"):
        no_data(ax, ONE_STEP)
        return
    mean_band(ax, rows, "step", "value", methods, marker="o")
    step_axis(ax)
    ax.set_ylabel(ylabel)


def _summary_rows_draw(rows: pd.DataFrame):
    """A small-multiples panel drawer of one summary metric vs step."""
    def draw(ax, drawn_methods, method):
        if rows.empty or single_valued(rows, "step"):
            return False
        return bool(mean_band(ax, rows, "step", "value", drawn_methods, marker="o", on_top=method))
    return draw


def _profile_draw(curves: pd.DataFrame):
    def draw(ax, drawn_methods, method):
        if curves.empty:
            return False
        ax.axvline(0.0, color="#999999", linewidth=0.6, zorder=1)
        return bool(mean_band(ax, curves, "alpha", "value", drawn_methods, on_top=method))
    return draw


def _alpha_axis(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))


def fig_landscape_random(study: Study, preset: str, out_dir: Path, profiles: ProfileCache,
                         direction_set: str = "random", **_) -> FigureResult:
    name = f"landscape_{direction_set}_{preset}"
    title = f"1-D loss landscape along {direction_set.replace('_', ' ')} directions ({preset})"
    landscape = preset_table(study, "landscape", preset)
    runs = preset_runs(study, preset)["run"].tolist()
    scope = _landscape_scope(landscape, profiles, runs, direction_set)
    curves = _collect_profiles(study, preset, direction_set, scope, profiles, [None])
    has_summary = landscape is not None and (landscape["direction_set"] == direction_set).any()
    if curves.empty and not has_summary:
        return FigureResult(name, title, skipped=f"no {direction_set} landscape profiles or rows for preset {preset}")
    methods = sorted_methods(set(curves["method"]) | (set(landscape.loc[landscape["direction_set"] == direction_set, "method"])
                                                     if has_summary else set()))
    checkpoints = pick_checkpoints(curves["step"].unique()) if not curves.empty else []
    if style.use_small_multiples(methods):
        figure = _random_rows(curves, landscape if has_summary else None, direction_set, scope, methods)
        layout = SMALL_MULTIPLES_NOTE
        where = {"profile": "Left", "steps": "the last checkpoint", "summary": "Middle and right"}
    else:
        figure = style.new_figure(2 * style.PANEL_HEIGHT + style.HEADER_HEIGHT + style.FOOTER_HEIGHT)
        top, bottom = figure.subfigures(2, 1, height_ratios=[1.0, 1.05])
        if checkpoints:
            axes = np.atleast_1d(top.subplots(1, len(checkpoints), sharey=True))
            _draw_profile_row(axes, curves, checkpoints, methods, "mean over directions")
            top.suptitle(f"profile averaged over directions, at {len(checkpoints)} checkpoints",
                         fontsize=style.FONT["panel_title"])
        else:
            no_data(top.subplots(), "no landscape_profiles.npz for these runs")
        es_ax, dv_ax = bottom.subplots(1, 2)
        if has_summary:
            _summary_vs_step(es_ax, landscape, direction_set, scope, "expected_sharpness", methods, None,
                             "expected sharpness [nats]")
            _summary_vs_step(dv_ax, landscape, direction_set, scope, "direction_variance", methods, None,
                             "direction variance [nats²]")
        else:
            no_data(es_ax, "no landscape.csv rows")
            no_data(dv_ax, "no landscape.csv rows")
        es_ax.set_title("expected sharpness vs step")
        dv_ax.set_title("direction variance vs step")
        method_legend(figure, methods)
        layout = ""
        where = {"profile": "Top", "steps": "up to five checkpoints", "summary": "Bottom"}
    figure.suptitle(f"{title} — parameter scope: {scope}")
    caption = (f"{where['profile']}: L(θ+αd) − L(θ) averaged over the {direction_set} directions at {where['steps']} "
               f"(each method perturbs its own native parameters). {where['summary']}: expected sharpness and direction "
               f"variance vs step (METRICS.md §1).") + layout + seed_note(curves if not curves.empty else landscape)
    return FigureResult(name, title, caption, save_figure(figure, out_dir, name))


def _random_rows(curves: pd.DataFrame, landscape: pd.DataFrame | None, direction_set: str, scope: str, methods):
    """Small multiples of the random-direction figure: per method, its profile at the last
    checkpoint, expected sharpness and direction variance vs step, each next to full rank's."""
    last = int(curves["step"].max()) if not curves.empty else None
    figure = style.new_figure(rows_height(methods))
    titles = [f"L(θ+αd) − L(θ) [nats], step {step_label(last) if last is not None else '–'}",
              "expected sharpness [nats]", "direction variance [nats²]"]
    rows, axes = method_rows(figure, methods, titles, ["α (step along direction)", "training step", "training step"])
    draw_rows(axes[:, 0], rows, methods, _profile_draw(curves[curves["step"] == last] if last is not None else curves))
    for column, metric in ((1, "expected_sharpness"), (2, "direction_variance")):
        summary = (_summary_rows(landscape, direction_set, scope, metric, None) if landscape is not None
                   else pd.DataFrame(columns=["method", "step", "value"]))
        draw_rows(axes[:, column], rows, methods, _summary_rows_draw(summary))
        if single_valued(summary, "step") and not summary.empty:
            axes[0, column].set_title(f"{titles[column]}\n({ONE_STEP})")
        step_axis(axes[-1, column])
    _alpha_axis(axes[-1, 0])
    style.legend(figure, reference_legend(methods))
    return figure


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
    landscape = preset_table(study, "landscape", preset)
    runs = preset_runs(study, preset)["run"].tolist()
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
        checkpoints = pick_checkpoints(curves["step"].unique())
        shown_k = [k for k in k_values if (curves["k"] == k).any()]
        if style.use_small_multiples(methods):
            last = int(curves["step"].max())
            figure = style.new_figure(rows_height(methods))
            rows, axes = method_rows(figure, methods, [f"top-{k}: L(θ+αd) − L(θ) [nats]" for k in shown_k],
                                     "α (step along direction)")
            for column, k in enumerate(shown_k):
                at_last = curves[(curves["k"] == k) & (curves["step"] == last)]
                draw_rows(axes[:, column], rows, methods, _profile_draw(at_last))
                _alpha_axis(axes[-1, column])
            style.legend(figure, reference_legend(methods))
            figure.suptitle(f"{title} at step {step_label(last)} — parameter scope: {scope}")
            caption = (f"Column K: L(θ+α·d_k) − L(θ) averaged over the singular directions d_k = σ_k u_k v_kᵀ, k ≤ K, "
                       f"at the last checkpoint (step {step_label(last)}).") + SMALL_MULTIPLES_NOTE + seed_note(curves)
        else:
            figure = style.new_figure(style.PANEL_HEIGHT * 0.8 * len(shown_k) + style.HEADER_HEIGHT + style.FOOTER_HEIGHT)
            axes = np.atleast_2d(figure.subplots(len(shown_k), len(checkpoints), sharey="row", squeeze=False))
            for row, k in enumerate(shown_k):
                _draw_profile_row(axes[row], curves[curves["k"] == k], checkpoints, methods, f"top-{k}")
                if row < len(shown_k) - 1:
                    for ax in axes[row]:
                        ax.set_xlabel("")
            method_legend(figure, methods)
            figure.suptitle(f"{title} — parameter scope: {scope}")
            caption = ("Row K: L(θ+α·d_k) − L(θ) averaged over the singular directions d_k = σ_k u_k v_kᵀ, k ≤ K, "
                       "at up to five checkpoints.") + seed_note(curves)
        results.append(FigureResult(name, title, caption, save_figure(figure, out_dir, name)))

    name = f"landscape_{direction_set}_summary_{preset}"
    title = f"Sharpness and direction variance along top-K {label} directions ({preset})"
    if not has_summary:
        results.append(FigureResult(name, title, skipped=f"no {direction_set} rows in landscape.csv for preset {preset}"))
        return results
    rows_of = {(metric, k): _summary_rows(landscape, direction_set, scope, metric, k)
               for metric in ("expected_sharpness", "direction_variance") for k in k_values}
    summary_rows = landscape[landscape["direction_set"] == direction_set]
    if single_valued(summary_rows, "step"):
        results.append(FigureResult(name, title, skipped=f"one checkpoint per run in landscape.csv ({direction_set}): "
                                                          "no trend over steps to draw; the values are in the geometry table"))
        return results
    if style.use_small_multiples(methods):
        # Direction variance over one direction (K = 1) is 0 by definition: no column for it.
        columns = [("expected_sharpness", k) for k in k_values] + [("direction_variance", k) for k in k_values if k != 1]
        figure = style.new_figure(rows_height(methods))
        titles = [f"top-{k}: {'expected sharpness [nats]' if metric == 'expected_sharpness' else 'direction variance [nats²]'}"
                  for metric, k in columns]
        rows, axes = method_rows(figure, methods, titles, "training step")
        for column, key in enumerate(columns):
            draw_rows(axes[:, column], rows, methods, _summary_rows_draw(rows_of[key]))
            step_axis(axes[-1, column])
        style.legend(figure, reference_legend(methods))
        layout = " One row per method, full rank (near-black) in every panel, axes shared per column."
        where = "Expected sharpness (first columns) and across-component direction variance (last columns, none for K = 1)"
    else:
        figure = style.new_figure(2 * style.PANEL_HEIGHT * 0.85 + style.HEADER_HEIGHT + style.FOOTER_HEIGHT)
        axes = np.atleast_2d(figure.subplots(2, len(k_values), squeeze=False))
        for column, k in enumerate(k_values):
            _summary_vs_step(axes[0, column], landscape, direction_set, scope, "expected_sharpness", methods, k,
                             "expected sharpness [nats]" if column == 0 else "")
            axes[0, column].set_title(f"top-{k}: expected sharpness")
            axes[0, column].set_xlabel("")
            if k == 1:
                no_data(axes[1, column], "direction variance is 0 for K = 1")
            else:
                # The y label goes on the first panel of the row that has axes (K = 1 has none).
                first = column == 0 or (column == 1 and k_values[0] == 1)
                _summary_vs_step(axes[1, column], landscape, direction_set, scope, "direction_variance", methods, k,
                                 "direction variance [nats²]" if first else "")
            axes[1, column].set_title(f"top-{k}: direction variance")
        method_legend(figure, methods)
        layout = ""
        where = "Expected sharpness (top row) and across-component direction variance (bottom row)"
    figure.suptitle(f"{title} — parameter scope: {scope}")
    caption = f"{where} vs step, per K." + layout + seed_note(summary_rows)
    results.append(FigureResult(name, title, caption, save_figure(figure, out_dir, name)))
    return results


def landscape_direction_sets(study: Study, preset: str, profiles: ProfileCache) -> list[str]:
    sets: set[str] = set()
    table = preset_table(study, "landscape", preset)
    if table is not None:
        sets |= set(table["direction_set"].dropna().astype(str))
    for run in preset_runs(study, preset)["run"]:
        sets |= {key.split("/")[1] for key in profiles.get(run) if key.startswith("alphas/")}
    order = ["random", "random_filter", "singular", "singular_unweighted", "trajectory_pca"]
    return sorted(sets, key=lambda s: (order.index(s) if s in order else len(order), s))
