"""The significance map as a figure: methods as rows, metrics as columns, each cell coloured by its
standardised difference to full rank and marked where a test (or the seed baseline) separates it;
the cells and their meaning come from :mod:`rankscope.report.significance_map`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import to_rgb

from rankscope.report.figures import style
from rankscope.report.figures.base import FigureResult, save_figure
from rankscope.report.significance_map import OUTSIDE, SEPARATED, cell_text, colour


def draw_significance_map(cells: pd.DataFrame, labels: dict[str, str]):
    """The Figure (not saved) of one scale's map; `cells` is :func:`significance_map`'s frame."""
    metrics = list(dict.fromkeys(cells["metric"]))
    methods = list(dict.fromkeys(cells["method"]))
    grid = cells.set_index(["method", "metric"])
    image = np.ones((len(methods), len(metrics), 3))
    # Rows of ~0.4 in and room below for the rotated metric names (up to ~45 characters).
    figure = style.new_figure(style.HEADER_HEIGHT + 0.4 * len(methods) + 2.6)
    ax = figure.add_subplot(1, 1, 1)
    for i, method in enumerate(methods):
        for j, metric in enumerate(metrics):
            row = grid.loc[(method, metric)]
            image[i, j] = to_rgb(colour(row["d"], row["cell"]))
            strong = row["cell"] in (SEPARATED, OUTSIDE) and np.isfinite(row["d"]) and abs(row["d"]) > 2.2
            text = cell_text(row["cell"], row["d"])
            ax.text(j, i, text, ha="center", va="center", fontsize=style.FONT["annotation"] - 1,
                    color="white" if strong else "#222222", fontweight="bold" if row["cell"] == SEPARATED else None)
    ax.imshow(image, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(metrics)), [labels.get(m, m) for m in metrics], rotation=40, ha="right",
                  rotation_mode="anchor", fontsize=style.FONT["tick"] - 0.5)
    ax.set_yticks(range(len(methods)), methods, fontsize=style.FONT["tick"])
    ax.set_xticks(np.arange(-0.5, len(metrics)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(methods)), minor=True)
    ax.grid(False)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set_title("Each method against full rank (d; * separated by the corrected test, ◆ outside the seed range)",
                 fontsize=style.FONT["panel_title"])
    return figure


def fig_significance_map(cells: pd.DataFrame, labels: dict[str, str], preset: str, out_dir: Path,
                         caption: str) -> FigureResult:
    name, title = f"significance_map_{preset}", f"significance map ({preset})"
    if cells.empty:
        return FigureResult(name, title, skipped="no method other than full rank has results at this scale")
    path = save_figure(draw_significance_map(cells, labels), out_dir, name)
    return FigureResult(name, title, caption=caption, path=path)


__all__ = ["draw_significance_map", "fig_significance_map"]
