"""The intruder-dimension figure: intruders per matrix by layer, against the seed baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from rankscope.report.collect import (
    REFERENCE_METHOD,
    Study,
    applicable_mask,
    sorted_methods,
)
from rankscope.report.figures.base import (
    FigureResult,
    _line_width,
    _method_legend,
    _new_figure,
    _save,
    line_style,
    method_color,
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
    figure = _new_figure(9.5, 3.4)
    axes = figure.subplots(1, 2, sharey=True)
    panels = [(axes[0], "cross-seed", "against full rank of other seeds"), (axes[1], "init", "against own initialisation")]
    for ax, pairing, label in panels:
        here = rows[rows["pairing"] == pairing]
        for method in methods:
            mine = here[here["method"] == method]
            if mine.empty:
                continue
            per_run = mine.groupby(["run", "reference_run", "layer"])["value"].mean().reset_index()
            by_layer = per_run.groupby("layer")["value"]
            x = np.array(sorted(per_run["layer"].unique()), dtype=float)
            if method == REFERENCE_METHOD and pairing == "cross-seed":
                ax.fill_between(x, by_layer.min().to_numpy(), by_layer.max().to_numpy(), color=method_color(method),
                                alpha=0.18, linewidth=0)
            ax.plot(x, by_layer.mean().to_numpy(), color=method_color(method), linewidth=_line_width(method),
                    linestyle=line_style(method), marker="o", markersize=3.5)
        ax.set_title(label, fontsize=9.5)
        ax.set_xlabel("layer")
        ax.set_xticks(sorted(rows["layer"].unique()))
    axes[0].set_ylabel("intruders per matrix (mean)")
    band = Patch(facecolor=method_color(REFERENCE_METHOD), alpha=0.18, label="seed baseline (full rank, min..max)")
    _method_legend(figure, methods, [band])
    figure.suptitle(title)
    caption = ("Per layer, the mean number of intruder dimensions per block matrix (of its top-k singular directions, "
               "those with no reference direction at |cosine| ≥ the threshold) at each run's last analysed checkpoint. "
               "Left: against the full-rank runs of the other seeds; the band is full rank's own count against its other "
               "seeds (the seed baseline, min..max over the pairs). Right: against the run's own initialisation.")
    not_applicable = sorted(set(table.loc[~applicable_mask(table), "method"].astype(str)) - set(methods))
    if not_applicable:
        caption += f" Not applicable for: {', '.join(not_applicable)} (no dense weight)."
    return FigureResult(name, title, caption, _save(figure, out_dir, name))
