"""Spectral figures: the mean over matrices of each spectral metric of W and ΔW vs step."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rankscope.report.collect import Study, sorted_methods, spectral_means
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
