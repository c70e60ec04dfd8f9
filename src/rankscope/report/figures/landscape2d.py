"""2-D loss-landscape figure: contours of L(θ + x·d1 + y·d2) − L(θ) at each run's last step, one
row per direction pair (random, top-2 singular), one column per method (mean over seeds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rankscope.report.collect import Study, load_surfaces, sorted_methods
from rankscope.report.figures.base import FigureResult, _new_figure, _no_data, _preset_runs, _save, method_color

PAIR_LABELS = {"random": ("random d₁", "random d₂"), "singular": ("σ₁u₁v₁ᵀ", "σ₂u₂v₂ᵀ")}


def mean_surfaces(study: Study, preset: str) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, int]]:
    """``{(pair, method): (mean surface over seeds, axis, seeds)}`` at each run's last step with a
    surface, in the primary scope (``all`` when present)."""
    collected: dict[tuple[str, str], list[np.ndarray]] = {}
    axes: dict[str, np.ndarray] = {}
    for run in _preset_runs(study, preset).itertuples(index=False):
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


def fig_landscape2d(study: Study, preset: str, out_dir: Path, **_) -> FigureResult:
    name, title = f"landscape2d_{preset}", f"2-D loss landscape at the last checkpoint ({preset})"
    surfaces = mean_surfaces(study, preset)
    if not surfaces:
        return FigureResult(name, title, skipped=f"no landscape2d_surfaces.npz for preset {preset}")
    pairs = [p for p in ("random", "singular") if any(k[0] == p for k in surfaces)]
    methods = sorted_methods({m for _, m in surfaces})
    figure = _new_figure(2.7 * len(methods) + 1.4, 2.6 * len(pairs) + 0.8)
    grid = np.atleast_2d(figure.subplots(len(pairs), len(methods), squeeze=False))
    for row, pair in enumerate(pairs):
        present = [surfaces[(pair, m)][0] for m in methods if (pair, m) in surfaces]
        # One colour scale per row, so the methods' basins compare at a glance.
        top = max(float(np.nanmax(s)) for s in present)
        bottom = min(float(np.nanmin(s)) for s in present)
        levels = np.linspace(bottom, top if top > bottom else bottom + 1e-12, 15)
        contour = None
        for column, method in enumerate(methods):
            ax = grid[row, column]
            if (pair, method) not in surfaces:
                _no_data(ax, "no surface")
                continue
            values, axis, seeds = surfaces[(pair, method)]
            contour = ax.contourf(axis, axis, values, levels=levels, cmap="viridis")
            ax.contour(axis, axis, values, levels=levels[::3], colors="white", linewidths=0.4)
            ax.plot([0.0], [0.0], marker="+", color="white", markersize=8)
            ax.set_title(f"{method} ({seeds} seed{'s' if seeds > 1 else ''})", color=method_color(method), fontsize=9.5)
            ax.set_xlabel(f"α along {PAIR_LABELS[pair][0]}")
            if column == 0:
                ax.set_ylabel(f"{pair}\nβ along {PAIR_LABELS[pair][1]}")
            ax.grid(False)
            ax.ticklabel_format(style="sci", scilimits=(-2, 2))
        if contour is not None:
            bar = figure.colorbar(contour, ax=list(grid[row]), shrink=0.9)
            bar.set_label("L(θ+αd₁+βd₂) − L(θ) [nats]")
    figure.suptitle(title)
    caption = ("Loss surface around each method's final checkpoint, averaged over seeds, in its own native parameters "
               "(+: θ). Random: two seeded Gaussian directions over the 1-D random radius; singular: the top two "
               "σ-weighted singular directions of every weight over the singular radius. One colour scale per row.")
    return FigureResult(name, title, caption, _save(figure, out_dir, name))
