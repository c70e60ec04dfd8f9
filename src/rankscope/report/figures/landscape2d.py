"""2-D loss-landscape figures: contours of L(θ + x·d1 + y·d2) − L(θ) at each run's last step, one
figure per direction pair (random, top-2 singular), one map per method (mean over seeds) in a grid
of maps big enough to read (style.MAP_PANEL), all on one colour scale with one colourbar."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from rankscope.report.collect import Study, load_surfaces, sorted_methods
from rankscope.report.figures import style
from rankscope.report.figures.base import (
    FigureResult,
    method_color,
    preset_runs,
    save_figure,
)

PAIR_LABELS = {"random": ("random d₁", "random d₂"), "singular": ("σ₁u₁v₁ᵀ", "σ₂u₂v₂ᵀ")}


def mean_surfaces(study: Study, preset: str) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, int]]:
    """``{(pair, method): (mean surface over seeds, axis, seeds)}`` at each run's last step with a
    surface, in the primary scope (``all`` when present)."""
    collected: dict[tuple[str, str], list[np.ndarray]] = {}
    axes: dict[str, np.ndarray] = {}
    for run in preset_runs(study, preset).itertuples(index=False):
        arrays = load_surfaces(study.run_dir(run.run))
        keys = [k for k in arrays if k.count("/") == 2 and not k.startswith("axes/")]
        for pair in sorted({k.split("/")[0] for k in keys}):
            scopes = {k.split("/")[1] for k in keys if k.startswith(pair + "/")}
            scope = "all" if "all" in scopes else sorted(scopes)[0]
            last = max(k for k in keys if k.startswith(f"{pair}/{scope}/"))
            collected.setdefault((pair, str(run.method)), []).append(np.asarray(arrays[last], dtype=float))
            axes[pair] = np.asarray(arrays.get(f"axes/{pair}"), dtype=float)
    return {key: (np.mean(values, axis=0), axes[key[0]], len(values)) for key, values in collected.items()
            if all(v.shape == values[0].shape for v in values)}


def fig_landscape2d(study: Study, preset: str, out_dir: Path, **_) -> list[FigureResult]:
    """One figure per direction pair: ``landscape2d_<preset>`` for the random pair (the name the
    report always had), ``landscape2d_<pair>_<preset>`` for the others."""
    name, title = f"landscape2d_{preset}", f"2-D loss landscape at the last checkpoint ({preset})"
    surfaces = mean_surfaces(study, preset)
    if not surfaces:
        return [FigureResult(name, title, skipped=f"no landscape2d_surfaces.npz for preset {preset}")]
    pairs = [p for p in PAIR_LABELS if any(k[0] == p for k in surfaces)]
    results = []
    for pair in pairs:
        pair_name = name if pair == "random" else f"landscape2d_{pair}_{preset}"
        pair_title = f"2-D loss landscape at the last checkpoint, {pair} directions ({preset})"
        figure = draw_landscape2d(surfaces, pair, pair_title)
        caption = (f"Loss surface around each method's final checkpoint, averaged over seeds, in its own native "
                   f"parameters (+: θ), along {PAIR_DESCRIPTIONS[pair]}. One map per method, all on one colour scale "
                   f"(one colourbar; thin white lines: every third level), so the methods' basins compare directly.")
        results.append(FigureResult(pair_name, pair_title, caption, save_figure(figure, out_dir, pair_name)))
    return results


PAIR_DESCRIPTIONS = {
    "random": "two seeded Gaussian directions over the 1-D random radius",
    "singular": "the top two σ-weighted singular directions of every weight over the singular radius",
}


def draw_landscape2d(surfaces: dict, pair: str, title: str) -> Figure:
    """The maps of one direction pair: a grid of ``style.panel_columns`` columns, one shared
    colour scale (vmin/vmax over every method's surface) and one colourbar."""
    methods = sorted_methods({m for p, m in surfaces if p == pair})
    columns = style.panel_columns(len(methods))
    rows = -(-len(methods) // columns)
    figure = style.new_figure(style.MAP_PANEL * rows + style.HEADER_HEIGHT + style.FOOTER_HEIGHT)
    grid = np.atleast_2d(figure.subplots(rows, columns, squeeze=False, sharex=True, sharey=True))
    present = [surfaces[(pair, m)][0] for m in methods]
    vmin = min(float(np.nanmin(s)) for s in present)
    vmax = max(float(np.nanmax(s)) for s in present)
    vmax = vmax if vmax > vmin else vmin + 1e-12
    levels = np.linspace(vmin, vmax, 15)
    contour = None
    for index, ax in enumerate(grid.ravel()):
        if index >= len(methods):
            ax.set_visible(False)
            continue
        method = methods[index]
        values, axis, seeds = surfaces[(pair, method)]
        contour = ax.contourf(axis, axis, values, levels=levels, cmap=style.SEQUENTIAL_CMAP, vmin=vmin, vmax=vmax)
        ax.contour(axis, axis, values, levels=levels[::3], colors="white", linewidths=0.5)
        ax.plot([0.0], [0.0], marker="+", color="white", markersize=10)
        ax.set_title(f"{method} ({seeds} seed{'s' if seeds > 1 else ''})", color=method_color(method))
        ax.set_aspect("equal")
        ax.grid(False)
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    for column in range(columns):
        # The lowest map of each column carries the x axis (the last row may be part empty).
        lowest = grid[(len(methods) - 1 - column) // columns, column]
        lowest.xaxis.set_tick_params(labelbottom=True)
        lowest.set_xlabel(f"α along {PAIR_LABELS[pair][0]}")
    for ax in grid[:, 0]:
        ax.set_ylabel(f"β along {PAIR_LABELS[pair][1]}")
    # Below the grid, not beside it: the page's width goes to the maps.
    bar = figure.colorbar(contour, ax=grid.ravel().tolist(), location="bottom", shrink=0.6, aspect=40)
    bar.set_label("L(θ+αd₁+βd₂) − L(θ) [nats]")
    figure.suptitle(title)
    return figure
