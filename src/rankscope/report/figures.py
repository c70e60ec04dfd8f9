"""The study's figures (matplotlib, Agg canvas; pyplot is never used, so building a report does
not change the backend of the caller's session).

Conventions kept by every figure:
- one fixed colour per method, from `method_color` (full-rank always near-black), in every
  figure and legend, so a reader learns the colours once;
- lines are the mean over seeds; the band (fill_between) or error bar is ± one sample standard
  deviation over seeds, drawn only where at least two seeds exist;
- axes carry names and units; a figure without data is not drawn: its function returns a
  `FigureResult` with `skipped` saying why, and the report prints that line.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator

from rankscope.report.collect import (
    REFERENCE_METHOD,
    Study,
    applicable_mask,
    finite,
    load_profiles,
    sorted_methods,
    spectral_means,
)

log = logging.getLogger("rankscope.report")

# --- colours ----------------------------------------------------------------------------------

# Okabe–Ito (colour-blind safe) first, then distinct extras; full-rank is the near-black reference.
METHOD_COLORS: dict[str, str] = {
    "full": "#222222",
    "galore": "#0072B2",
    "fira": "#009E73",
    "cola": "#D55E00",
    "sltrain": "#CC79A7",
    "relora": "#E69F00",
    "lora": "#56B4E9",
    "loro": "#7B3FA0",
    "lowrank": "#8C564B",
    "spectron": "#A6A614",
}
# Methods not listed above (new registry entries) get one of these, chosen by a hash of the
# name, so the colour is the same in every figure and every report without any shared state.
_EXTRA_COLORS = ["#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#17BECF", "#BCBD22", "#E377C2"]


def method_color(method: str) -> str:
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    digest = int(hashlib.sha1(str(method).encode()).hexdigest(), 16)
    return _EXTRA_COLORS[digest % len(_EXTRA_COLORS)]


def palette(methods: Sequence[str]) -> dict[str, str]:
    """The colour of each method (the same mapping every figure uses)."""
    return {m: method_color(m) for m in methods}


def _line_width(method: str) -> float:
    return 2.2 if method == REFERENCE_METHOD else 1.6


STYLE = {
    "font.size": 10, "axes.titlesize": 10.5, "axes.labelsize": 10, "legend.fontsize": 9,
    "xtick.labelsize": 8.5, "ytick.labelsize": 8.5, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 110, "savefig.dpi": 110,
    "axes.formatter.useoffset": False,
}
SCORE_COLORS = {"r2_in_sample": "#4C72B0", "loso_pearson": "#DD8452", "lomo_pearson": "#55A868"}
SCORE_LABELS = {"r2_in_sample": "in-sample R²", "loso_pearson": "LOSO Pearson r", "lomo_pearson": "LOMO Pearson r"}


@dataclass
class FigureResult:
    name: str                 # file stem under report/figures/
    title: str
    caption: str = ""
    path: Path | None = None
    skipped: str | None = None  # why the figure was not drawn


# --- helpers ----------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    figure.savefig(path)
    return path


def _step_label(step: float) -> str:
    step = float(step)
    if abs(step) >= 1000:
        text = f"{step / 1000:.1f}".rstrip("0").rstrip(".")
        return f"{text}k"
    return f"{step:g}"


_STEP_FORMATTER = FuncFormatter(lambda value, _: _step_label(value))


def _step_axis(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.xaxis.set_major_formatter(_STEP_FORMATTER)
    ax.set_xlabel("training step")


def _method_legend(figure: Figure, methods: Sequence[str], extra: Sequence = ()) -> None:
    handles = [Line2D([], [], color=method_color(m), linewidth=_line_width(m), label=m) for m in methods]
    figure.legend(handles=handles + list(extra), loc="outside right upper", title="method", frameon=False)


def _mean_band(ax, frame: pd.DataFrame, x: str, y: str, methods: Sequence[str], marker: str | None = None) -> list[str]:
    """Per method: the mean of `y` over seeds at each `x` as a line, ± std as a band. Returns the
    methods drawn."""
    drawn = []
    for method in methods:
        rows = frame[(frame["method"] == method) & finite(frame[y])]
        if rows.empty:
            continue
        stats = rows.groupby(x)[y].agg(["mean", "std", "count"]).reset_index().sort_values(x)
        color = method_color(method)
        ax.plot(stats[x], stats["mean"], color=color, linewidth=_line_width(method), marker=marker,
                markersize=3.5, label=method, zorder=3 if method == REFERENCE_METHOD else 2)
        band = stats["count"] >= 2
        if band.any():
            ax.fill_between(stats.loc[band, x], (stats["mean"] - stats["std"])[band],
                            (stats["mean"] + stats["std"])[band], color=color, alpha=0.18, linewidth=0)
        drawn.append(method)
    _widen_flat_axis(ax)
    return drawn


def _widen_flat_axis(ax) -> None:
    """A y range that is flat to rounding (CKA of the reference with itself: 1 ± 1e-13) would
    get an offset label like '1e-12+1'; show it as a flat line at its value instead."""
    values = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()] or [np.zeros(0)])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    center, span = float(values.mean()), float(np.ptp(values))
    if center != 0 and span <= 1e-6 * abs(center):
        half = 0.05 * abs(center)
        ax.set_ylim(center - half, center + half)


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777777", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_color("#DDDDDD")


def _pick_checkpoints(steps: Sequence[int], count: int = 5) -> list[int]:
    """`count` checkpoints spread evenly over the available ones, always including the last."""
    steps = sorted(set(int(s) for s in steps))
    if len(steps) <= count:
        return steps
    picks = np.unique(np.round(np.linspace(0, len(steps) - 1, count)).astype(int))
    return [steps[i] for i in picks]


def _preset_runs(study: Study, preset: str) -> pd.DataFrame:
    return study.runs[study.runs["preset"].astype(str) == str(preset)]


def _table(study: Study, family: str, preset: str) -> pd.DataFrame | None:
    table = study.tables.get(family)
    if table is None:
        return None
    table = table[table["preset"].astype(str) == str(preset)]
    return table if not table.empty else None


def _seed_note(frame: pd.DataFrame) -> str:
    counts = frame.groupby("method")["seed"].nunique()
    if counts.empty:
        return ""
    if counts.max() < 2:
        return " One seed per method: no seed bands."
    seeds = f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()}–{counts.max()}"
    return f" Lines: mean over seeds; bands: ± 1 std over seeds ({seeds} seeds per method)."


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


# --- figures --------------------------------------------------------------------------------------------


def fig_training_curves(study: Study, preset: str, out_dir: Path, **_) -> FigureResult:
    name, title = f"training_loss_{preset}", f"Training and validation loss ({preset})"
    log_rows = study.training[study.training["preset"].astype(str) == str(preset)]
    if log_rows.empty or not finite(log_rows["loss"]).any():
        return FigureResult(name, title, skipped=f"no metrics.jsonl with training loss for preset {preset}")
    methods = sorted_methods(log_rows["method"].unique())
    figure = _new_figure(11, 4)
    train_ax, val_ax = figure.subplots(1, 2)
    drawn = _mean_band(train_ax, log_rows[finite(log_rows["loss"])], "step", "loss", methods)
    train_ax.set_ylabel("training loss [nats/token]")
    train_ax.set_title("training loss (logged steps)")
    _step_axis(train_ax)
    val_rows = log_rows[finite(log_rows["val_loss"])]
    if val_rows.empty:
        _no_data(val_ax, "no validation evaluations logged")
    else:
        _mean_band(val_ax, val_rows, "step", "val_loss", methods, marker="o")
        _step_axis(val_ax)
        val_ax.set_ylabel("validation loss [nats/token]")
    val_ax.set_title("validation loss (exact, token-weighted)")
    _method_legend(figure, drawn)
    figure.suptitle(title)
    caption = "Loss curves from each run's metrics.jsonl." + _seed_note(log_rows)
    return FigureResult(name, title, caption, _save(figure, out_dir, name))


def fig_val_ppl(study: Study, preset: str, out_dir: Path, **_) -> FigureResult:
    name, title = f"val_ppl_{preset}", f"Validation perplexity per seed ({preset})"
    runs = _preset_runs(study, preset)
    runs = runs[finite(runs["val_ppl"])]
    if runs.empty:
        return FigureResult(name, title, skipped=f"no run of preset {preset} has a validation perplexity")
    methods = sorted_methods(runs["method"].unique())
    figure = _new_figure(max(4.5, 1.0 + 0.9 * len(methods)), 3.8)
    ax = figure.subplots()
    for index, method in enumerate(methods):
        values = runs.loc[runs["method"] == method, "val_ppl"].astype(float).to_numpy()
        offsets = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(index + offsets, values, color=method_color(method), s=22, alpha=0.75, zorder=3)
        error = np.std(values, ddof=1) if len(values) >= 2 else None
        ax.errorbar(index + 0.3, values.mean(), yerr=error, fmt="D", color=method_color(method),
                    markersize=6, capsize=4, linewidth=1.5, zorder=4)
    ax.set_xticks(range(len(methods)), methods)
    for label, method in zip(ax.get_xticklabels(), methods):
        label.set_color(method_color(method))
    ax.set_xlim(-0.6, len(methods) - 0.3)
    ax.grid(axis="x", visible=False)
    ax.set_ylabel("validation perplexity")
    ax.set_xlabel("method")
    ax.set_title(title)
    caption = ("Dots: individual seeds; diamond: mean, error bar ± 1 std over seeds (where ≥ 2 seeds). "
               "Perplexity is exp of the exact token-weighted mean next-token loss on the validation set.")
    return FigureResult(name, title, caption, _save(figure, out_dir, name))


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


def fig_ccbh(study: Study, preset: str, out_dir: Path, **_) -> FigureResult:
    name, title = f"ccbh_{preset}", f"Consecutive-checkpoint barrier height (CCBH) vs step ({preset})"
    table = _table(study, "interpolation", preset)
    if table is None or not (table["kind"] == "ccbh").any():
        return FigureResult(name, title, skipped=f"no CCBH rows in interpolation.csv for preset {preset}")
    ccbh = table[table["kind"] == "ccbh"].copy()
    not_applicable = ccbh[~applicable_mask(ccbh)]
    ccbh = ccbh[applicable_mask(ccbh)]
    x = "step_b" if "step_b" in ccbh.columns else "step"
    for column in ("barrier", "relative_barrier", x):
        if column in ccbh.columns:
            ccbh[column] = pd.to_numeric(ccbh[column], errors="coerce")
    methods = sorted_methods(table.loc[table["kind"] == "ccbh", "method"].unique())
    figure = _new_figure(11, 4)
    for ax, column, ylabel in zip(figure.subplots(1, 2), ("barrier", "relative_barrier"),
                                  ("barrier height [nats]", "relative barrier (barrier / mean endpoint loss)")):
        if column not in ccbh.columns or not finite(ccbh[column]).any():
            _no_data(ax, f"no {column} values")
            continue
        _mean_band(ax, ccbh[finite(ccbh[column])], x, column, methods, marker="o")
        _step_axis(ax)
        ax.set_xlabel("training step (later checkpoint of the pair)")
        ax.set_ylabel(ylabel)
        ax.axhline(0.0, color="#999999", linewidth=0.6)
        ax.set_title(column.replace("_", " "))
    _method_legend(figure, methods)
    figure.suptitle(title)
    caption = "Barrier of the straight path between consecutive checkpoints, in each method's native parameters."
    if not not_applicable.empty:
        caption += f" Not applicable: {', '.join(sorted(set(not_applicable['run'])))}."
    caption += _seed_note(ccbh)
    return FigureResult(name, title, caption, _save(figure, out_dir, name))


def imbh_matrix(interpolation: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Methods, mean IMBH barrier between each pair of methods at each run's final step (mean over
    the seed pairs; the barrier is symmetric in the two ends), and a matrix of cell states:
    1 = value, 0 = not applicable, -1 = not computed."""
    imbh = interpolation[interpolation["kind"] == "imbh"].copy()
    if "other_run" in imbh.columns:  # a run interpolated with itself (barrier 0) is a check, not a pair
        imbh = imbh[imbh["other_run"].astype(str) != imbh["run"].astype(str)]
    imbh["step"] = pd.to_numeric(imbh["step"], errors="coerce")
    imbh = imbh[imbh["step"] == imbh.groupby("run")["step"].transform("max")]
    imbh["barrier"] = pd.to_numeric(imbh["barrier"], errors="coerce")
    imbh["ok"] = applicable_mask(imbh)
    methods = sorted_methods(set(imbh["method"]) | set(imbh["other_method"].dropna().astype(str)))
    index = {m: i for i, m in enumerate(methods)}
    values = np.full((len(methods), len(methods)), np.nan)
    state = np.full((len(methods), len(methods)), -1)
    sums: dict[tuple[int, int], list[float]] = {}
    for row in imbh.itertuples(index=False):
        other = str(row.other_method)
        if other not in index:
            continue
        i, j = sorted((index[str(row.method)], index[other]))
        if row.ok and np.isfinite(row.barrier):
            sums.setdefault((i, j), []).append(float(row.barrier))
        elif state[i, j] != 1:
            state[i, j] = state[j, i] = 0
    for (i, j), barriers in sums.items():
        values[i, j] = values[j, i] = float(np.mean(barriers))
        state[i, j] = state[j, i] = 1
    return methods, values, state


def fig_imbh(study: Study, preset: str, out_dir: Path, **_) -> FigureResult:
    name, title = f"imbh_{preset}", f"Inter-method barrier height (IMBH), final step ({preset})"
    table = _table(study, "interpolation", preset)
    if table is None or not (table["kind"] == "imbh").any():
        return FigureResult(name, title, skipped=f"no IMBH rows in interpolation.csv for preset {preset}")
    methods, values, state = imbh_matrix(table)
    size = 1.0 + 0.85 * len(methods)
    figure = _new_figure(size + 1.8, size + 0.4)
    ax = figure.subplots()
    ax.grid(False)
    present = values[np.isfinite(values)]
    vmin, vmax = (float(present.min()), float(present.max())) if present.size else (0.0, 1.0)
    if vmax <= vmin:
        vmax = vmin + 1e-12
    cmap = matplotlib.colormaps["viridis"]
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax)
    for i in range(len(methods)):
        for j in range(len(methods)):
            if state[i, j] == 1:
                shade = (values[i, j] - vmin) / (vmax - vmin)
                ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=8.5,
                        color="white" if shade < 0.55 else "black")
                continue
            hatch = "///" if state[i, j] == 0 else None
            ax.add_patch(matplotlib.patches.Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#EEEEEE",
                                                      edgecolor="#AAAAAA", hatch=hatch, linewidth=0.5))
            ax.text(j, i, "n/a" if state[i, j] == 0 else "—", ha="center", va="center", fontsize=8.5, color="#444444")
    ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right")
    ax.set_yticks(range(len(methods)), methods)
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for label, method in zip(labels, methods):
            label.set_color(method_color(method))
    ax.spines[["top", "right"]].set_visible(True)
    colorbar = figure.colorbar(image, ax=ax, shrink=0.85)
    colorbar.set_label("barrier height [nats], mean over seed pairs")
    ax.set_title(title)
    legend = [Patch(facecolor="#EEEEEE", edgecolor="#AAAAAA", hatch="///", label="n/a: not applicable"),
              Patch(facecolor="#EEEEEE", edgecolor="#AAAAAA", label="—: not computed")]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False, fontsize=8)
    caption = ("Barrier on the straight path between two runs at the final step, interpolated in dense space. "
               "Diagonal: same method, different seeds. n/a (hatched): a method without a dense equivalent; "
               "—: pair not computed.")
    return FigureResult(name, title, caption, _save(figure, out_dir, name))


SPECTRAL_PANELS = {
    "W": ["effective_rank", "stable_rank", "spectral_gap", "count_above", "fro_norm"],
    "dW": ["effective_rank", "stable_rank", "spectral_gap", "count_above", "relative_fro_norm"],
}
SPECTRAL_LABELS = {
    "effective_rank": "effective rank", "stable_rank": "stable rank", "spectral_gap": "spectral gap (σ₁−σ₂)/σ₁",
    "count_above": "# σ > threshold", "fro_norm": "Frobenius norm", "relative_fro_norm": "relative Frobenius norm",
}


def fig_spectral(study: Study, preset: str, out_dir: Path, **_) -> FigureResult:
    name, title = f"spectral_{preset}", f"Spectral metrics of W and ΔW vs step ({preset})"
    table = _table(study, "spectral", preset)
    if table is None:
        return FigureResult(name, title, skipped=f"no spectral.csv rows for preset {preset}")
    means = spectral_means(table)
    targets = [t for t in SPECTRAL_PANELS if (means["target"] == t).any()]
    if not targets:
        return FigureResult(name, title, skipped=f"spectral.csv of preset {preset} has no W or dW rows")
    methods = sorted_methods(means["method"].unique())
    columns = max(len(SPECTRAL_PANELS[t]) for t in targets)
    figure = _new_figure(3.0 * columns + 1.6, 3.0 * len(targets) + 0.6)
    axes = np.atleast_2d(figure.subplots(len(targets), columns, squeeze=False))
    for row, target in enumerate(targets):
        symbol = "W" if target == "W" else "ΔW"
        for column, metric in enumerate(SPECTRAL_PANELS[target]):
            ax = axes[row, column]
            rows = means[(means["target"] == target) & (means["metric"] == metric)]
            if rows.empty:
                _no_data(ax, f"no {metric} rows")
            else:
                _mean_band(ax, rows, "step", "value", methods, marker="o")
                _step_axis(ax)
            label = SPECTRAL_LABELS.get(metric, metric)
            ax.set_ylabel(r"$\|\Delta W\|_F \,/\, \|W_{t-1}\|_F$" if metric == "relative_fro_norm"
                          else f"{label} of {symbol}")
            ax.set_title(f"{symbol}: {label}", fontsize=9.5)
    missing = sorted(set(study.runs.loc[study.runs["preset"].astype(str) == str(preset), "method"].dropna())
                     - set(means.loc[means["target"] == "W", "method"]))
    _method_legend(figure, methods)
    figure.suptitle(title + " — mean over attention and MLP matrices")
    caption = ("Each panel: the equal-weight mean over the attention and MLP matrices of every block; "
               "ΔW = W_t − W_{t−1} between consecutive checkpoints (METRICS.md §3).")
    if missing:
        caption += f" No dense-W rows for: {', '.join(missing)}."
    caption += _seed_note(means)
    return FigureResult(name, title, caption, _save(figure, out_dir, name))


SIMILARITY_PANELS = [("l2", "L2 distance  mean‖h_ref − h‖₂"), ("relative_l2", "relative L2 distance"),
                     ("cosine", "cosine similarity"), ("cka", "linear CKA")]


def fig_similarity(study: Study, preset: str, out_dir: Path, **_) -> FigureResult:
    name, title = f"similarity_{preset}", f"Activation similarity to the full-rank reference, per layer ({preset})"
    table = _table(study, "similarity", preset)
    if table is None:
        return FigureResult(name, title, skipped=f"no similarity.csv rows for preset {preset}")
    ok = table[applicable_mask(table)].copy()
    skipped = table[~applicable_mask(table)]
    if ok.empty:
        reasons = "; ".join(sorted(set(skipped.get("reason", pd.Series(dtype=str)).dropna().astype(str))))
        return FigureResult(name, title, skipped=f"no applicable similarity rows for preset {preset} ({reasons or 'no reason'})")
    ok["layer"] = pd.to_numeric(ok["layer"], errors="coerce")
    ok["step"] = pd.to_numeric(ok["step"], errors="coerce")
    checkpoints = _pick_checkpoints(ok["step"].dropna().unique(), count=3)
    metrics = [(m, label) for m, label in SIMILARITY_PANELS if (ok["metric"] == m).any()]
    methods = sorted_methods(ok["method"].unique())
    figure = _new_figure(3.0 * len(metrics) + 1.6, 2.7 * len(checkpoints) + 0.6)
    axes = np.atleast_2d(figure.subplots(len(checkpoints), len(metrics), squeeze=False, sharex=True))
    for row, step in enumerate(checkpoints):
        for column, (metric, label) in enumerate(metrics):
            ax = axes[row, column]
            rows = ok[(ok["step"] == step) & (ok["metric"] == metric)]
            if rows.empty:
                _no_data(ax)
            else:
                _mean_band(ax, rows, "layer", "value", methods, marker="o")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
            ax.set_title(f"{label.split('  ')[0]} — step {_step_label(step)}", fontsize=9.5)
            ax.set_ylabel(label.split("  ")[-1] if metric == "l2" else label)
            if row == len(checkpoints) - 1:
                ax.set_xlabel("layer (0 = embedding output)")
    _method_legend(figure, methods)
    figure.suptitle(title)
    caption = "Hidden states on the probe set compared with the full-rank run of the same scale and seed at the same step."
    not_applicable = sorted(set(skipped["method"].astype(str)) - set(ok["method"]))
    if not_applicable:
        caption += f" Not applicable for: {', '.join(not_applicable)}."
    caption += _seed_note(ok)
    return FigureResult(name, title, caption, _save(figure, out_dir, name))


def fig_downstream(study: Study, preset: str, out_dir: Path, **_) -> FigureResult:
    name, title = f"downstream_{preset}", f"Zero-shot downstream accuracy ({preset})"
    rows = study.downstream[(study.downstream["preset"].astype(str) == str(preset)) & finite(study.downstream["acc"])]
    if rows.empty:
        return FigureResult(name, title, skipped=f"no eval/step_XXXXXX.json with task accuracies for preset {preset}")
    mean_rows = rows.groupby(["run", "method", "seed"], as_index=False)["acc"].mean().assign(task="mean")
    rows = pd.concat([rows[["run", "method", "seed", "task", "acc"]], mean_rows], ignore_index=True)
    tasks = sorted(set(rows["task"]) - {"mean"}) + ["mean"]
    methods = sorted_methods(rows["method"].unique())
    width = 0.8 / len(methods)
    figure = _new_figure(max(6.0, 0.35 * len(tasks) * len(methods) + 2.5), 4.2)
    ax = figure.subplots()
    for offset, method in enumerate(methods):
        stats = rows[rows["method"] == method].groupby("task")["acc"].agg(["mean", "std", "count"]).reindex(tasks)
        positions = np.arange(len(tasks)) - 0.4 + width * (offset + 0.5)
        errors = np.where(stats["count"] >= 2, stats["std"], np.nan) * 100
        ax.bar(positions, stats["mean"] * 100, width=width * 0.92, color=method_color(method), label=method,
               yerr=errors, capsize=2.5, error_kw={"elinewidth": 1, "ecolor": "#444444"})
    ax.set_xticks(range(len(tasks)), tasks, rotation=30 if len(tasks) > 5 else 0, ha="right" if len(tasks) > 5 else "center")
    ax.axvline(len(tasks) - 1.5, color="#999999", linewidth=0.8, linestyle="--")
    ax.grid(axis="x", visible=False)
    ax.set_ylabel("zero-shot accuracy [%]")
    ax.set_xlabel("task")
    ax.set_ylim(0, min(100, max(10.0, float(rows["acc"].max()) * 100 * 1.15)))
    ax.set_title(title)
    _method_legend(figure, methods)
    caption = "Accuracy of the final checkpoint per task; 'mean' is the mean over tasks." + (
        " Error bars: ± 1 std over seeds." if rows.groupby("method")["seed"].nunique().max() >= 2 else
        " One seed per method: no error bars.")
    return FigureResult(name, title, caption, _save(figure, out_dir, name))


def fig_predictor(study: Study, out_dir: Path, **_) -> FigureResult:
    name, title = "predictor", "Predicting downstream accuracy: validation loss vs geometry"
    table = study.predictor
    if table is None or table.empty:
        return FigureResult(name, title, skipped="no STUDY_DIR/predictor.csv")
    scores = [s for s in SCORE_LABELS if s in table.columns]
    if "feature_set" not in table.columns or not scores:
        return FigureResult(name, title, skipped="predictor.csv lacks feature_set or score columns")
    sets = table["feature_set"].astype(str).tolist()
    width = 0.8 / len(scores)
    figure = _new_figure(max(6.5, 2.2 * len(sets) + 2.5), 4.3)
    ax = figure.subplots()
    plotted = []
    for offset, score in enumerate(scores):
        values = pd.to_numeric(table[score], errors="coerce").to_numpy(dtype=float)
        spread = (pd.to_numeric(table[f"{score}_std"], errors="coerce").to_numpy(dtype=float)
                  if f"{score}_std" in table.columns else np.full(len(values), np.nan))
        positions = np.arange(len(sets)) - 0.4 + width * (offset + 0.5)
        drawn = np.isfinite(values)
        ax.bar(positions[drawn], values[drawn], width=width * 0.92, color=SCORE_COLORS[score],
               yerr=spread[drawn], capsize=3, label=SCORE_LABELS[score], error_kw={"elinewidth": 1})
        for position, value, error in zip(positions[drawn], values[drawn], spread[drawn]):
            # The number sits beyond the error bar, so the two never overlap.
            reach = abs(error) if np.isfinite(error) else 0.0
            ax.text(position, value + (reach + 0.03 if value >= 0 else -reach - 0.03), f"{value:.2f}", ha="center",
                    va="bottom" if value >= 0 else "top", fontsize=7.5)
            plotted += [value - reach, value + reach]
        for position in positions[~drawn]:
            ax.text(position, 0.02, "n/a", ha="center", va="bottom", fontsize=8, color="#555555", rotation=90)
    ax.set_ylim(min([-0.05] + [v - 0.15 for v in plotted]), max([1.05] + [v + 0.15 for v in plotted]))
    ax.axhline(0.0, color="#777777", linewidth=0.7)
    ax.set_xticks(range(len(sets)), sets)
    ax.set_xlabel("feature set")
    ax.set_ylabel("score (R² or Pearson r)")
    ax.set_title(title)
    ax.grid(axis="x", visible=False)
    # Handles built by hand: a score that is n/a everywhere draws no bar, yet keeps its legend colour.
    handles = [Patch(facecolor=SCORE_COLORS[s], label=SCORE_LABELS[s]) for s in scores]
    figure.legend(handles=handles, loc="outside right upper", frameon=False, title="score")
    caption = ("Ridge regression on standardized features (METRICS.md §5). LOSO / LOMO: Pearson r of "
               "leave-one-scale-out / leave-one-method-out predictions; n/a: not computable (see the table notes).")
    if any(f"{s}_std" in table.columns for s in scores):
        caption += " Error bars: ± 1 std of the score over seed replicates."
    return FigureResult(name, title, caption, _save(figure, out_dir, name))


# --- all figures ----------------------------------------------------------------------------------------


def _guarded(function: Callable, name: str, title: str, *args, **kwargs) -> list[FigureResult]:
    """A figure that fails on unexpected data becomes a skipped line in the report, not a crash
    of the whole report (the study may still be running and writing files)."""
    try:
        result = function(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported in the report and the log
        log.warning("figure %s failed: %s", name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return [FigureResult(name, title, skipped=f"could not be drawn: {type(exc).__name__}: {exc}")]
    return result if isinstance(result, list) else [result]


def landscape_direction_sets(study: Study, preset: str, profiles: ProfileCache) -> list[str]:
    sets: set[str] = set()
    table = _table(study, "landscape", preset)
    if table is not None:
        sets |= set(table["direction_set"].dropna().astype(str))
    for run in _preset_runs(study, preset)["run"]:
        sets |= {key.split("/")[1] for key in profiles.get(run) if key.startswith("alphas/")}
    order = ["random", "random_filter", "singular", "singular_unweighted", "trajectory_pca"]
    return sorted(sets, key=lambda s: (order.index(s) if s in order else len(order), s))


def render_preset_figures(study: Study, preset: str, out_dir: Path, profiles: ProfileCache | None = None) -> list[FigureResult]:
    profiles = profiles or ProfileCache(study)
    results: list[FigureResult] = []
    results += _guarded(fig_training_curves, f"training_loss_{preset}", "training loss", study, preset, out_dir)
    results += _guarded(fig_val_ppl, f"val_ppl_{preset}", "validation perplexity", study, preset, out_dir)
    direction_sets = landscape_direction_sets(study, preset, profiles)
    if not direction_sets:
        results.append(FigureResult(f"landscape_{preset}", f"1-D loss landscape ({preset})",
                                    skipped=f"no landscape.csv rows or profiles for preset {preset}"))
    for direction_set in direction_sets:
        function = fig_landscape_singular if direction_set.startswith("singular") else fig_landscape_random
        results += _guarded(function, f"landscape_{direction_set}_{preset}", f"landscape {direction_set}",
                            study, preset, out_dir, profiles=profiles, direction_set=direction_set)
    results += _guarded(fig_ccbh, f"ccbh_{preset}", "CCBH", study, preset, out_dir)
    results += _guarded(fig_imbh, f"imbh_{preset}", "IMBH", study, preset, out_dir)
    results += _guarded(fig_spectral, f"spectral_{preset}", "spectral metrics", study, preset, out_dir)
    results += _guarded(fig_similarity, f"similarity_{preset}", "activation similarity", study, preset, out_dir)
    results += _guarded(fig_downstream, f"downstream_{preset}", "downstream accuracy", study, preset, out_dir)
    return results


def render_all(study: Study, out_dir: Path) -> dict[str, list[FigureResult]]:
    """Every figure, grouped by preset ('' for study-wide figures)."""
    import matplotlib as mpl

    with mpl.rc_context(STYLE):
        profiles = ProfileCache(study)
        grouped = {preset: render_preset_figures(study, preset, out_dir, profiles) for preset in study.presets()}
        grouped[""] = _guarded(fig_predictor, "predictor", "predictor", study, out_dir)
    return grouped


__all__ = [
    "METHOD_COLORS", "FigureResult", "ProfileCache", "fig_ccbh", "fig_downstream", "fig_imbh",
    "fig_landscape_random", "fig_landscape_singular", "fig_predictor", "fig_similarity", "fig_spectral",
    "fig_training_curves", "fig_val_ppl", "imbh_matrix", "method_color", "palette", "render_all",
    "render_preset_figures",
]
