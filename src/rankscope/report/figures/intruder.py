"""The intruder-dimension figure: intruders per matrix by layer, against the seed baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from rankscope.report.collect import (
    REFERENCE_METHOD,
    Study,
    applicable_mask,
    sorted_methods,
)
from rankscope.report.figures import style
from rankscope.report.figures.base import (
    FigureResult,
    draw_rows,
    line_style,
    line_width,
    method_color,
    method_legend,
    method_rows,
    rows_height,
    save_figure,
)
from rankscope.report.intruder import last_step, preset_rows


def fig_intruder(study: Study, preset: str, out_dir: Path, **_) -> FigureResult:
    """Mean intruders per matrix by layer: each method against full rank (other seeds) with the seed
    baseline as a band, and against its own initialisation next to full rank's."""
    name, title = f"intruder_{preset}", f"Intruder dimensions per layer against the seed baseline ({preset})"
    table = preset_rows(study, preset)
    if table is None:
        return FigureResult(name, title, skipped=f"no intruder.csv rows for preset {preset}")
    rows = table[applicable_mask(table) & (table["metric"] == "intruders")]
    rows = last_step(rows[pd.to_numeric(rows["layer"], errors="coerce") >= 0])
    if rows.empty:
        return FigureResult(name, title, skipped=f"no applicable per-matrix intruder rows for preset {preset}")
    rows = rows.assign(layer=pd.to_numeric(rows["layer"]))
    methods = sorted_methods(rows["method"].unique())
    pairings = [("cross-seed", "against full rank of other seeds"), ("init", "against own initialisation")]
    band = Patch(facecolor=method_color(REFERENCE_METHOD), alpha=style.BAND_ALPHA, label="seed baseline (full rank, min..max)")
    if style.use_small_multiples(methods):
        figure = style.new_figure(rows_height(methods))
        rows_of, axes = method_rows(figure, methods, [f"intruders per matrix, {label}" for _, label in pairings], "layer")
        for column, (pairing, _) in enumerate(pairings):
            here = rows[rows["pairing"] == pairing]
            draw_rows(axes[:, column], rows_of, methods,
                      lambda ax, drawn, method, here=here, pairing=pairing: _intruder_lines(ax, here, drawn, pairing, method))
            axes[-1, column].set_xticks(sorted(rows["layer"].unique()))
        reference = Line2D([], [], color=method_color(REFERENCE_METHOD), linewidth=line_width(REFERENCE_METHOD),
                           label="full rank (in every panel)")
        style.legend(figure, [reference, band])
        layout = " One row per method, full rank (near-black) and its band in every panel."
    else:
        figure = style.new_figure(style.PANEL_HEIGHT + style.FOOTER_HEIGHT)
        axes = figure.subplots(1, 2, sharey=True)
        for ax, (pairing, label) in zip(axes, pairings):
            _intruder_lines(ax, rows[rows["pairing"] == pairing], methods, pairing)
            ax.set_title(label)
            ax.set_xlabel("layer")
            ax.set_xticks(sorted(rows["layer"].unique()))
        axes[0].set_ylabel("intruders per matrix (mean)")
        method_legend(figure, methods, [band])
        layout = ""
    figure.suptitle(title)
    caption = ("Per layer, the mean number of intruder dimensions per block matrix (of its top-k singular directions, "
               "those with no reference direction at |cosine| ≥ the threshold) at each run's last analysed checkpoint. "
               "Left: against the full-rank runs of the other seeds; the band is full rank's own count against its other "
               "seeds (the seed baseline, min..max over the pairs). Right: against the run's own initialisation.") + layout
    not_applicable = sorted(set(table.loc[~applicable_mask(table), "method"].astype(str)) - set(methods))
    if not_applicable:
        caption += f" Not applicable for: {', '.join(not_applicable)} (no dense weight)."
    return FigureResult(name, title, caption, save_figure(figure, out_dir, name))


def _intruder_lines(ax, here: pd.DataFrame, methods, pairing: str, on_top: str = REFERENCE_METHOD) -> bool:
    """Per method, the mean intruder count per layer; full rank against its other seeds also as
    a band (min..max over its runs: the seed baseline)."""
    drawn = False
    for method in methods:
        mine = here[here["method"] == method]
        if mine.empty:
            continue
        per_run = mine.groupby(["run", "reference_run", "layer"])["value"].mean().reset_index()
        by_layer = per_run.groupby("layer")["value"]
        x = np.array(sorted(per_run["layer"].unique()), dtype=float)
        if method == REFERENCE_METHOD and pairing == "cross-seed":
            ax.fill_between(x, by_layer.min().to_numpy(), by_layer.max().to_numpy(), color=method_color(method),
                            alpha=style.BAND_ALPHA, linewidth=0)
        ax.plot(x, by_layer.mean().to_numpy(), color=method_color(method), linewidth=line_width(method),
                linestyle=line_style(method), marker="o", markersize=3.5, zorder=3 if method == on_top else 2)
        drawn = True
    return drawn
