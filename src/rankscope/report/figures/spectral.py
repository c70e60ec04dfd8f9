"""Spectral figures: the mean over matrices of each spectral metric of W and ΔW vs step."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rankscope.report.collect import Study, finite, sorted_methods, spectral_means
from rankscope.report.figures import style
from rankscope.report.figures.base import (
    FigureResult,
    draw_rows,
    mean_band,
    method_legend,
    method_rows,
    no_data,
    preset_table,
    reference_legend,
    rows_height,
    save_figure,
    seed_note,
    single_valued,
    step_axis,
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


# Small multiples put each target in its own figure: spectral_<preset> for W, these for the others.
TARGET_NAMES = {"W_native": "", "dW_native": "dW_", "W": "merged_W_"}
CAPTION = ("Each panel: the equal-weight mean over matrices at each checkpoint. W and ΔW are the study's: every "
           "native 2-D matrix of the attention and MLP modules (a factored layer's factors, LoRA/ReLoRA's base and "
           "factors); merged W is each layer's effective dense weight (ours); ΔW = W_t − W_{t−1} between "
           "consecutive checkpoints (METRICS.md §3).")


def _ylabel(metric: str, symbol: str) -> str:
    label = SPECTRAL_LABELS.get(metric, metric)
    return r"$\|\Delta W\|_F \,/\, \|W_{t-1}\|_F$" if metric == "relative_fro_norm" else f"{label} of {symbol}"


def fig_spectral(study: Study, preset: str, out_dir: Path, **_) -> list[FigureResult]:
    name, title = f"spectral_{preset}", f"Spectral metrics of W and ΔW vs step ({preset})"
    table = preset_table(study, "spectral", preset)
    if table is None:
        return [FigureResult(name, title, skipped=f"no spectral.csv rows for preset {preset}")]
    means = spectral_means(table)
    means = means[finite(means["value"])]  # not-applicable rows (CoLA's merged W) carry no value
    targets = [t for t in SPECTRAL_PANELS if (means["target"] == t).any()]
    if not targets:
        return [FigureResult(name, title, skipped=f"spectral.csv of preset {preset} has no W or ΔW rows")]
    methods = sorted_methods(means["method"].unique())
    in_preset = set(study.runs.loc[study.runs["preset"].astype(str) == str(preset), "method"].dropna())
    missing = sorted(in_preset - set(means.loc[means["target"] == "W", "method"]))
    tail = (f" Merged W not applicable (no dense weight) for: {', '.join(missing)}." if missing else "") + seed_note(means)
    # A target with one checkpoint per run (ΔW of a study with two checkpoints) has one value per
    # method: no curve to draw.
    one_step = [t for t in targets if single_valued(means[means["target"] == t], "step")]
    if style.use_small_multiples(methods):
        results = []
        for target in targets:
            symbol, metrics = SPECTRAL_PANELS[target]
            target_name = f"spectral_{TARGET_NAMES.get(target, target + '_')}{preset}"
            target_title = f"Spectral metrics of {symbol} vs step ({preset})"
            rows_here = means[means["target"] == target]
            if target in one_step:
                results.append(FigureResult(target_name, target_title, skipped=(
                    f"one checkpoint per run with {symbol} values: one value per method, no curve to draw; "
                    "see spectral.csv")))
                continue
            figure = style.new_figure(rows_height(methods))
            rows, axes = method_rows(figure, methods, [SPECTRAL_LABELS.get(m, m) for m in metrics], "training step")
            for column, metric in enumerate(metrics):
                values = rows_here[rows_here["metric"] == metric]

                def draw(ax, drawn_methods, method, values=values):
                    return bool(mean_band(ax, values, "step", "value", drawn_methods, marker="o", on_top=method))
                draw_rows(axes[:, column], rows, methods, draw)
                step_axis(axes[-1, column])
            style.legend(figure, reference_legend(methods))
            figure.suptitle(f"{target_title} — mean over attention and MLP matrices")
            caption = CAPTION + (" One row per method, full rank (near-black) in every panel, axes shared per column."
                                 ) + tail
            results.append(FigureResult(target_name, target_title, caption, save_figure(figure, out_dir, target_name)))
        return results
    drawn_targets = [t for t in targets if t not in one_step]
    if not drawn_targets:
        return [FigureResult(name, title, skipped="one checkpoint per run: one value per method, no curve to draw; "
                                                   "see spectral.csv")]
    columns = max(len(SPECTRAL_PANELS[t][1]) for t in drawn_targets)
    figure = style.new_figure(style.PANEL_HEIGHT * 0.8 * len(drawn_targets) + style.HEADER_HEIGHT + style.FOOTER_HEIGHT)
    axes = np.atleast_2d(figure.subplots(len(drawn_targets), columns, squeeze=False))
    for row, target in enumerate(drawn_targets):
        symbol, metrics = SPECTRAL_PANELS[target]
        for column, metric in enumerate(metrics):
            ax = axes[row, column]
            rows = means[(means["target"] == target) & (means["metric"] == metric)]
            if rows.empty:
                no_data(ax, f"no {metric} rows")
            else:
                mean_band(ax, rows, "step", "value", methods, marker="o")
                step_axis(ax)
            ax.set_ylabel(_ylabel(metric, symbol))
            ax.set_title(f"{symbol}: {SPECTRAL_LABELS.get(metric, metric)}")
    method_legend(figure, methods)
    figure.suptitle(title + " — mean over attention and MLP matrices")
    caption = CAPTION
    if one_step:
        caption += (f" Not drawn (one checkpoint per run, one value per method): "
                    f"{', '.join(SPECTRAL_PANELS[t][0] for t in one_step)}.")
    return [FigureResult(name, title, caption + tail, save_figure(figure, out_dir, name))]
