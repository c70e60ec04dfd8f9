"""Activation-similarity figures: per-layer L2, cosine and CKA to the full-rank reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from rankscope.report.collect import Study, applicable_mask, sorted_methods
from rankscope.report.figures.base import (
    FigureResult,
    _mean_band,
    _method_legend,
    _new_figure,
    _no_data,
    _pick_checkpoints,
    _save,
    _seed_note,
    _step_label,
    _table,
)


SIMILARITY_PANELS = [("l2", "L2 distance  mean‖h_ref − h‖₂"), ("relative_l2", "relative L2 distance"),
                     ("mean_norm", "activation norm  mean‖h‖₂"),
                     ("cosine", "cosine similarity"), ("cka", "linear CKA")]


def fig_similarity(study: Study, preset: str, out_dir: Path, **_) -> FigureResult:
    name, title = f"similarity_{preset}", f"Activation similarity to the full-rank reference, per layer ({preset})"
    table = _table(study, "similarity", preset)
    if table is None:
        return FigureResult(name, title, skipped=f"no similarity.csv rows for preset {preset}")
    ok = table[applicable_mask(table)].copy()
    skipped = table[~applicable_mask(table)]
    if ok.empty:
        reasons = "; ".join(sorted(set(skipped.get("reason", pd.Series(dtype=str)).dropna().astype(str))))
        return FigureResult(name, title, skipped=f"no applicable similarity rows for preset {preset} ({reasons or 'no reason'})")
    ok["layer"] = pd.to_numeric(ok["layer"], errors="coerce")
    ok["step"] = pd.to_numeric(ok["step"], errors="coerce")
    checkpoints = _pick_checkpoints(ok["step"].dropna().unique(), count=3)
    metrics = [(m, label) for m, label in SIMILARITY_PANELS if (ok["metric"] == m).any()]
    methods = sorted_methods(ok["method"].unique())
    figure = _new_figure(3.0 * len(metrics) + 1.6, 2.7 * len(checkpoints) + 0.6)
    axes = np.atleast_2d(figure.subplots(len(checkpoints), len(metrics), squeeze=False, sharex=True))
    for row, step in enumerate(checkpoints):
        for column, (metric, label) in enumerate(metrics):
            ax = axes[row, column]
            rows = ok[(ok["step"] == step) & (ok["metric"] == metric)]
            if rows.empty:
                _no_data(ax)
            else:
                _mean_band(ax, rows, "layer", "value", methods, marker="o")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
            ax.set_title(f"{label.split('  ')[0]} — step {_step_label(step)}", fontsize=9.5)
            ax.set_ylabel(label.split("  ")[-1] if "  " in label else label)
            if row == len(checkpoints) - 1:
                ax.set_xlabel("layer (0 = embedding output)")
    _method_legend(figure, methods)
    figure.suptitle(title)
    caption = "Hidden states on the probe set compared with the full-rank run of the same scale and seed at the same step."
    not_applicable = sorted(set(skipped["method"].astype(str)) - set(ok["method"]))
    if not_applicable:
        caption += f" Not applicable for: {', '.join(not_applicable)}."
    caption += _seed_note(ok)
    return FigureResult(name, title, caption, _save(figure, out_dir, name))
