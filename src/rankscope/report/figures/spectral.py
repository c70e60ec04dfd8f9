"""Spectral figures: the mean over matrices of each spectral metric of W and ΔW vs step."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rankscope.report.collect import Study, finite, sorted_methods, spectral_means
from rankscope.report.figures.base import (
    FigureResult,
    _mean_band,
    _method_legend,
    _new_figure,
    _no_data,
    _save,
    _seed_note,
    _step_axis,
    _table,
)


# target -> (row label, metrics); W and ΔW are the study's (every native matrix), merged W ours.
SPECTRAL_PANELS: dict[str, tuple[str, list[str]]] = {
    "W_native": ("W", ["effective_rank", "stable_rank", "numerical_rank_ratio", "sv_ratio", "count_above", "fro_norm"]),
    "dW_native": ("ΔW", ["effective_rank", "stable_rank", "numerical_rank_ratio", "sv_ratio", "count_above", "relative_fro_norm"]),
    "W": ("merged W", ["effective_rank", "stable_rank", "numerical_rank_ratio", "sv_ratio", "count_above", "fro_norm"]),
}
SPECTRAL_LABELS = {
    "effective_rank": "effective rank", "stable_rank": "stable rank", "numerical_rank_ratio": "numerical rank / min(m, n)",
    "sv_ratio": "σ₂/σ₁", "count_above": "# σ > threshold", "fro_norm": "Frobenius norm",
    "relative_fro_norm": "relative Frobenius norm",
}


def fig_spectral(study: Study, preset: str, out_dir: Path, **_) -> FigureResult:
    name, title = f"spectral_{preset}", f"Spectral metrics of W and ΔW vs step ({preset})"
    table = _table(study, "spectral", preset)
    if table is None:
        return FigureResult(name, title, skipped=f"no spectral.csv rows for preset {preset}")
    means = spectral_means(table)
    means = means[finite(means["value"])]  # not-applicable rows (CoLA's merged W) carry no value
    targets = [t for t in SPECTRAL_PANELS if (means["target"] == t).any()]
    if not targets:
        return FigureResult(name, title, skipped=f"spectral.csv of preset {preset} has no W or ΔW rows")
    methods = sorted_methods(means["method"].unique())
    columns = max(len(SPECTRAL_PANELS[t][1]) for t in targets)
    figure = _new_figure(2.9 * columns + 1.6, 2.9 * len(targets) + 0.6)
    axes = np.atleast_2d(figure.subplots(len(targets), columns, squeeze=False))
    for row, target in enumerate(targets):
        symbol, metrics = SPECTRAL_PANELS[target]
        for column, metric in enumerate(metrics):
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
    in_preset = set(study.runs.loc[study.runs["preset"].astype(str) == str(preset), "method"].dropna())
    missing = sorted(in_preset - set(means.loc[means["target"] == "W", "method"]))
    _method_legend(figure, methods)
    figure.suptitle(title + " — mean over attention and MLP matrices")
    caption = ("Each panel: the equal-weight mean over matrices at each checkpoint. W and ΔW are the study's: every "
               "native 2-D matrix of the attention and MLP modules (a factored layer's factors, LoRA/ReLoRA's base and "
               "factors); merged W is each layer's effective dense weight (ours); ΔW = W_t − W_{t−1} between "
               "consecutive checkpoints (METRICS.md §3).")
    if missing:
        caption += f" Merged W not applicable (no dense weight) for: {', '.join(missing)}."
    caption += _seed_note(means)
    return FigureResult(name, title, caption, _save(figure, out_dir, name))
