"""Downstream figures: zero-shot accuracy per task, and how well the predictor's feature sets
predict it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from rankscope.report.collect import Study, finite, sorted_methods
from rankscope.report.figures import style
from rankscope.report.figures.base import (
    SCORE_COLORS,
    SCORE_LABELS,
    FigureResult,
    method_color,
    method_legend,
    save_figure,
)


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
    figure = style.new_figure(style.PANEL_HEIGHT + style.FOOTER_HEIGHT + 0.4)
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
    method_legend(figure, methods)
    caption = "Accuracy of the final checkpoint per task; 'mean' is the mean over tasks." + (
        " Error bars: ± 1 std over seeds." if rows.groupby("method")["seed"].nunique().max() >= 2 else
        " One seed per method: no error bars.")
    return FigureResult(name, title, caption, save_figure(figure, out_dir, name))


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
    figure = style.new_figure(style.PANEL_HEIGHT + style.FOOTER_HEIGHT)
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
                    va="bottom" if value >= 0 else "top", fontsize=style.FONT["annotation"])
            plotted += [value - reach, value + reach]
        for position in positions[~drawn]:
            ax.text(position, 0.02, "n/a", ha="center", va="bottom", fontsize=style.FONT["annotation"], color="#555555",
                    rotation=90)
    ax.set_ylim(min([-0.05] + [v - 0.15 for v in plotted]), max([1.05] + [v + 0.15 for v in plotted]))
    ax.axhline(0.0, color="#777777", linewidth=0.7)
    ax.set_xticks(range(len(sets)), sets)
    ax.set_xlabel("feature set")
    ax.set_ylabel("score (R² or Pearson r)")
    ax.set_title(title)
    ax.grid(axis="x", visible=False)
    # Handles built by hand: a score that is n/a everywhere draws no bar, yet keeps its legend colour.
    handles = [Patch(facecolor=SCORE_COLORS[s], label=SCORE_LABELS[s]) for s in scores]
    style.legend(figure, handles, title="score")
    caption = ("Ridge regression on standardized features (METRICS.md §5). LOSO / LOMO: Pearson r of "
               "leave-one-scale-out / leave-one-method-out predictions; n/a: not computable (see the table notes).")
    if any(f"{s}_std" in table.columns for s in scores):
        caption += " Error bars: ± 1 std of the score over seed replicates."
    return FigureResult(name, title, caption, save_figure(figure, out_dir, name))
