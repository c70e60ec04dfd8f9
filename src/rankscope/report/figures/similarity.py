"""Activation-similarity figures: per-layer L2, cosine and CKA to full rank, each against the
full-rank seed baseline drawn as a band (min..max over the seed pairs, dotted line: their mean)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from rankscope.report.baseline import SPREAD, SeedBaselines
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
    line_width,
    mean_band,
    method_color,
    method_legend,
    method_rows,
    no_data,
    pick_checkpoints,
    preset_table,
    rows_height,
    save_figure,
    seed_note,
    step_label,
    widen_flat_axis,
)

SIMILARITY_PANELS = [("l2", "L2 distance  mean‖h_ref − h‖₂"), ("relative_l2", "relative L2 distance"),
                     ("mean_norm", "activation norm  mean‖h‖₂"),
                     ("cosine", "cosine similarity"), ("cka", "linear CKA")]
PAIRING_STYLES = {"same-seed": "-", "cross-seed": "--"}


def baseline_band(ax, baselines: SeedBaselines, preset: str, metric: str, step: float, layers) -> bool:
    """The seed baseline of ``metric`` at ``step`` over ``layers`` as a band (min..max over the
    seed pairs) with its mean dotted; False where there is none."""
    points = [(layer, baselines.layer_baseline(preset, metric, step, layer)) for layer in sorted(layers)]
    points = [(layer, b) for layer, b in points if b.n]
    if not points:
        return False
    x = np.array([layer for layer, _ in points], dtype=float)
    color = method_color(REFERENCE_METHOD)
    ax.fill_between(x, [b.low for _, b in points], [b.high for _, b in points], color=color, alpha=style.BAND_ALPHA,
                    linewidth=0, zorder=1)
    ax.plot(x, [b.mean for _, b in points], color=color, linestyle=":", linewidth=1.6, zorder=2)
    return True


def baseline_legend(pairs: int | None) -> list:
    """Legend entries for the seed-baseline band and the two line styles."""
    color = method_color(REFERENCE_METHOD)
    entries = [Line2D([], [], color="#555555", linestyle=dash, label=f"{pairing} comparison")
               for pairing, dash in PAIRING_STYLES.items()]
    if pairs:
        entries.append(Patch(facecolor=color, alpha=style.BAND_ALPHA, label=f"seed baseline ({SPREAD}, {pairs} pairs)"))
        entries.append(Line2D([], [], color=color, linestyle=":", label="seed baseline mean"))
    return entries


def fig_similarity(study: Study, preset: str, out_dir: Path, baselines: SeedBaselines | None = None, **_) -> FigureResult:
    name, title = f"similarity_{preset}", f"Activation similarity to full rank, per layer, against the seed baseline ({preset})"
    table = preset_table(study, "similarity", preset)
    if table is None:
        return FigureResult(name, title, skipped=f"no similarity.csv rows for preset {preset}")
    ok = table[applicable_mask(table)].copy()
    skipped = table[~applicable_mask(table)]
    if ok.empty:
        reasons = "; ".join(sorted(set(skipped.get("reason", pd.Series(dtype=str)).dropna().astype(str))))
        return FigureResult(name, title, skipped=f"no applicable similarity rows for preset {preset} ({reasons or 'no reason'})")
    baselines = baselines or SeedBaselines(study)
    ok["layer"] = pd.to_numeric(ok["layer"], errors="coerce")
    ok["step"] = pd.to_numeric(ok["step"], errors="coerce")
    # Each comparison of a low-rank run with a full-rank run, by pairing; the norm is the run's own.
    long = baselines.long[(baselines.long["preset"].astype(str) == str(preset))
                          & (baselines.long["method"] != REFERENCE_METHOD)]
    norms = ok[ok["metric"] == "mean_norm"]
    if "pairing" in norms.columns:
        norms = norms[norms["pairing"].astype(str).isin(["self", "same-seed", "nan", ""])]
    checkpoints = pick_checkpoints(ok["step"].dropna().unique(), count=3)
    metrics = [(m, label) for m, label in SIMILARITY_PANELS if (ok["metric"] == m).any()]
    methods = sorted_methods(ok["method"].unique())
    if style.use_small_multiples(methods):
        figure, pairs = _similarity_rows(ok, norms, long, baselines, preset, checkpoints[-1], metrics, methods)
        title += f", step {step_label(checkpoints[-1])}"
        layout = (f" Last checkpoint (step {step_label(checkpoints[-1])}) only; layer 0 is the embedding output; one row per method, axes shared per "
                  "column; the grey band (full rank's seed baseline) and full rank's norm are in every panel.")
    else:
        figure = style.new_figure(style.PANEL_HEIGHT * 0.85 * len(checkpoints) + style.HEADER_HEIGHT + style.FOOTER_HEIGHT)
        axes = np.atleast_2d(figure.subplots(len(checkpoints), len(metrics), squeeze=False, sharex=True))
        pairs = 0
        for row, step in enumerate(checkpoints):
            for column, (metric, label) in enumerate(metrics):
                ax = axes[row, column]
                drawn, count = _similarity_panel(ax, ok, norms, long, baselines, preset, step, metric, methods)
                pairs = max(pairs, count)
                if not drawn:
                    no_data(ax)
                else:
                    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
                ax.set_title(f"{label.split('  ')[0]} — step {step_label(step)}")
                ax.set_ylabel(label.split("  ")[-1] if "  " in label else label)
                if row == len(checkpoints) - 1:
                    ax.set_xlabel("layer (0 = embedding output)")
        method_legend(figure, methods, baseline_legend(pairs))
        layout = ""
    figure.suptitle(title)
    caption = ("Hidden states on the probe set compared with a full-rank run at the same step: solid lines with the "
               "full-rank run of the same seed, dashed with the full-rank runs of the other seeds (mean over the "
               f"comparisons). Grey band: the full-rank seed baseline, the same metric between full-rank runs of "
               f"different seeds ({SPREAD}; dotted: its mean); the activation norm is each run's own.")
    missing = baselines.missing(preset)
    if missing:
        caption += f" No seed-baseline band: {missing}."
    caption += layout
    not_applicable = sorted(set(skipped["method"].astype(str)) - set(ok["method"]))
    if not_applicable:
        caption += f" Not applicable for: {', '.join(not_applicable)}."
    caption += seed_note(ok)
    return FigureResult(name, title, caption, save_figure(figure, out_dir, name))


def _comparison_lines(ax, rows: pd.DataFrame, methods) -> bool:
    """Per method and pairing, the mean over comparisons at each layer."""
    drawn = False
    for method in methods:
        for pairing, dash in PAIRING_STYLES.items():
            mine = rows[(rows["method"] == method) & (rows["pairing"] == pairing)]
            if mine.empty:
                continue
            mean = mine.groupby("layer")["value"].mean().sort_index()
            ax.plot(mean.index, mean.to_numpy(), color=method_color(method), linestyle=dash, linewidth=line_width(method),
                    marker="o" if pairing == "same-seed" else None, markersize=3.5, zorder=3)
            drawn = True
    return drawn


def _similarity_panel(ax, ok, norms, long, baselines, preset, step, metric, methods,
                      on_top: str = REFERENCE_METHOD) -> tuple[bool, int]:
    """One metric at one step for `methods`: the seed-baseline band and the comparison lines (the
    activation norm: each run's own, as mean ± std). Returns (anything drawn, seed pairs)."""
    pairs = 0
    if metric == "mean_norm":
        rows = norms[norms["step"] == step]
        return (bool(mean_band(ax, rows, "layer", "value", methods, marker="o", on_top=on_top)) if not rows.empty
                else False), 0
    layers = ok.loc[(ok["step"] == step) & (ok["metric"] == metric), "layer"].dropna().unique()
    drawn = baseline_band(ax, baselines, preset, metric, step, layers)
    if drawn:
        pairs = len(set(baselines.layer_baseline(preset, metric, step, max(layers)).pairs))
    drawn = _comparison_lines(ax, long[(long["step"] == step) & (long["metric"] == metric)], methods) or drawn
    widen_flat_axis(ax)
    return drawn, pairs


def _similarity_rows(ok, norms, long, baselines, preset, step, metrics, methods):
    """Small multiples at the last checkpoint: per method, each metric against the seed baseline."""
    figure = style.new_figure(rows_height(methods))
    titles = [label.split("  ")[0] for _, label in metrics]
    rows, axes = method_rows(figure, methods, titles, "layer (0: embeddings)")
    pairs = 0
    for column, (metric, _) in enumerate(metrics):
        def draw(ax, drawn_methods, method, metric=metric):
            nonlocal pairs
            # Full rank's comparison lines are the baseline itself: only the row's method draws lines.
            shown = drawn_methods if metric == "mean_norm" else [method]
            drawn, count = _similarity_panel(ax, ok, norms, long, baselines, preset, step, metric, shown, on_top=method)
            pairs = max(pairs, count)
            return drawn
        draw_rows(axes[:, column], rows, methods, draw)
        axes[-1, column].xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    handles = [Line2D([], [], color=style.REFERENCE_COLOR, linewidth=style.line_width("full"),
                      label="full rank's own activation norm (norm column)")] + baseline_legend(pairs)
    style.legend(figure, handles)
    return figure, pairs
