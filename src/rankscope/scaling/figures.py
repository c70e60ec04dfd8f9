"""Figures of a scaling fit: IsoFLOP profiles, loss vs compute, the compute-optimal frontier.

Same conventions as the study report: Agg canvas (pyplot never touched), one colour per method
from `rankscope.report.figures.method_color`, named axes with units.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from rankscope.report.collect import sorted_methods
from rankscope.report.figures import STYLE, FigureResult, method_color
from rankscope.report.figures.base import save_figure, sized_figure
from rankscope.scaling.optimal import loss, optimal_params


def fig_isoflop(table: pd.DataFrame, laws: dict[str, dict], optimal: dict, out_dir: Path) -> FigureResult:
    """Per method: the fitted loss along C = F(N)·D for four budgets inside the measured range,
    against N, with each profile's minimum marked; the runs as points coloured by their compute."""
    name, title = "isoflop", "IsoFLOP profiles of the fitted laws"
    import matplotlib as mpl

    methods = sorted_methods(laws)
    compute = table["compute"].to_numpy(float)
    budgets = np.logspace(math.log10(compute.min()), math.log10(compute.max()), 4)
    norm = mpl.colors.LogNorm(vmin=compute.min(), vmax=compute.max())
    cmap = mpl.colormaps["viridis"]
    columns = min(3, len(methods))
    rows = math.ceil(len(methods) / columns)
    figure = sized_figure(4.2 * columns + 1.2, 3.4 * rows)
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    n_all = table["params"].to_numpy(float)
    grid = np.logspace(math.log10(n_all.min() / 3), math.log10(n_all.max() * 3), 200)
    for ax, method in zip(axes, methods):
        law, train = laws[method], optimal[method]["_train"]
        mine = table[table["method"] == method]
        minima = []
        for budget in budgets:
            tokens = budget / train(grid)
            ax.plot(grid, loss(law, grid, tokens), color=cmap(norm(budget)), linewidth=1.4)
            best = float(optimal_params(law, train, budget))
            minima.append(float(loss(law, best, budget / train(best))))
            ax.plot([best], [minima[-1]], marker="o", color=cmap(norm(budget)), markeredgecolor="black", markersize=6)
        ax.scatter(mine["params"], mine["loss"], c=mine["compute"], cmap=cmap, norm=norm, marker="s",
                   edgecolors=method_color(method), linewidths=1.2, s=30, zorder=3)
        ax.set_xscale("log")
        ax.set_title(method, color=method_color(method))
        ax.set_xlabel("parameters N")
        ax.set_ylabel("loss [nats/token]")
        shown = np.concatenate([mine["loss"].to_numpy(float), [m for m in minima if math.isfinite(m)]])
        ax.set_ylim(shown.min() - 0.15 * np.ptp(shown) - 0.05, shown.max() + 0.3 * np.ptp(shown) + 0.05)
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    colorbar = figure.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(axes[: len(methods)]))
    colorbar.set_label("training compute C [FLOPs]")
    figure.suptitle(title)
    caption = ("Lines: the fitted L(N, D) along C = F(N)·D for four budgets spanning the measured runs "
               "(F: the method's training FLOPs per token); circles: each profile's minimum N*(C). Squares: "
               "the runs, coloured by their compute.")
    return FigureResult(name, title, caption, save_figure(figure, out_dir, name))


def fig_loss_vs_compute(table: pd.DataFrame, front: pd.DataFrame, out_dir: Path) -> FigureResult:
    name, title = "loss_vs_compute", "Loss against training compute, with the compute-optimal frontiers"
    figure = sized_figure(9, 4.6)
    ax = figure.subplots()
    for method in sorted_methods(table["method"].unique()):
        color = method_color(method)
        mine = table[table["method"] == method]
        ax.scatter(mine["compute"], mine["loss"], color=color, s=18, alpha=0.75)
        line = front[front["method"] == method]
        inside, outside = line[~line["extrapolated"]], line[line["extrapolated"]]
        ax.plot(inside["compute"], inside["loss"], color=color, linewidth=2.0, label=method)
        if len(outside):
            joined = pd.concat([inside.tail(1), outside])
            ax.plot(joined["compute"], joined["loss"], color=color, linewidth=1.4, linestyle="--")
        ax.fill_between(line["compute"], line["loss_low"], line["loss_high"], color=color, alpha=0.12, linewidth=0)
    ax.set_xscale("log")
    ax.set_xlabel("training compute C [FLOPs]")
    ax.set_ylabel("loss [nats/token]")
    figure.legend(*ax.get_legend_handles_labels(), loc="outside right upper", frameon=False, title="method")
    figure.suptitle(title)
    caption = ("Points: runs. Lines: the predicted loss of the compute-optimal (N*, D*) at each budget, "
               "dashed beyond the measured compute; bands: bootstrap interval of that prediction.")
    return FigureResult(name, title, caption, save_figure(figure, out_dir, name))


def fig_frontier(front: pd.DataFrame, out_dir: Path) -> FigureResult:
    name, title = "compute_optimal", "Compute-optimal model size and its inference cost"
    figure = sized_figure(11, 4)
    size_ax, cost_ax = figure.subplots(1, 2)
    for method in sorted_methods(front["method"].unique()):
        line = front[front["method"] == method]
        color = method_color(method)
        size_ax.plot(line["compute"], line["params"], color=color, label=method, linewidth=1.8)
        cost_ax.plot(line["compute"], line["inference_flops_per_token"], color=color, label=method, linewidth=1.8)
    for ax, label in ((size_ax, "compute-optimal parameters N*"), (cost_ax, "inference FLOPs per token of N*")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training compute C [FLOPs]")
        ax.set_ylabel(label)
    figure.legend(*size_ax.get_legend_handles_labels(), loc="outside right upper", frameon=False, title="method")
    figure.suptitle(title)
    caption = "N*(C) from each method's fitted law; right: forward FLOPs per token of that model (its inference cost)."
    return FigureResult(name, title, caption, save_figure(figure, out_dir, name))


def render(table: pd.DataFrame, laws: dict[str, dict], optimal: dict, front: pd.DataFrame, out_dir: Path) -> list[FigureResult]:
    import matplotlib as mpl

    with mpl.rc_context(STYLE):
        return [fig_isoflop(table, laws, optimal, out_dir), fig_loss_vs_compute(table, front, out_dir),
                fig_frontier(front, out_dir)]
