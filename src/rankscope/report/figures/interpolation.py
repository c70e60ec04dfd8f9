"""Interpolation-barrier figures: CCBH vs step, the IMBH matrix between methods, and each method's
IMBH to full rank against the full-rank seed baseline (a band: min..max over the seed pairs)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory

from rankscope.report.baseline import SPREAD, SeedBaselines
from rankscope.report.collect import (
    REFERENCE_METHOD,
    Study,
    applicable_mask,
    finite,
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
    preset_table,
    reference_legend,
    rows_height,
    save_figure,
    seed_note,
    single_valued,
    step_axis,
)


def fig_ccbh(study: Study, preset: str, out_dir: Path, **_) -> FigureResult:
    name, title = f"ccbh_{preset}", f"Consecutive-checkpoint barrier height (CCBH) vs step ({preset})"
    table = preset_table(study, "interpolation", preset)
    if table is None or not (table["kind"] == "ccbh").any():
        return FigureResult(name, title, skipped=f"no CCBH rows in interpolation.csv for preset {preset}")
    ccbh = table[table["kind"] == "ccbh"].copy()
    not_applicable = ccbh[~applicable_mask(ccbh)]
    ccbh = ccbh[applicable_mask(ccbh)]
    x = "step_b" if "step_b" in ccbh.columns else "step"
    for column in ("barrier", "relative_barrier", x):
        if column in ccbh.columns:
            ccbh[column] = pd.to_numeric(ccbh[column], errors="coerce")
    methods = sorted_methods(table.loc[table["kind"] == "ccbh", "method"].unique())
    if single_valued(ccbh, x):
        steps = sorted({int(v) for v in ccbh[x].dropna()})
        return FigureResult(name, title, skipped=(
            f"one consecutive-checkpoint pair per run (at step {', '.join(str(s) for s in steps) or '?'}): one value per "
            "method, no curve to draw; see interpolation.csv"))
    columns = [("barrier", "barrier height [nats]"), ("relative_barrier", "relative barrier (barrier / mean endpoint loss)")]
    if style.use_small_multiples(methods):
        figure = style.new_figure(rows_height(methods))
        rows, axes = method_rows(figure, methods, [label for _, label in columns],
                                 "training step (later checkpoint of the pair)")
        for index, (column, _) in enumerate(columns):
            values = ccbh[finite(ccbh[column])] if column in ccbh.columns else ccbh.iloc[:0]

            def draw(ax, drawn_methods, method, values=values, column=column):
                ax.axhline(0.0, color="#999999", linewidth=0.6)
                return bool(mean_band(ax, values, x, column, drawn_methods, marker="o", on_top=method))
            draw_rows(axes[:, index], rows, methods, draw)
            step_axis(axes[-1, index])
            axes[-1, index].set_xlabel("training step (later checkpoint of the pair)")
        style.legend(figure, reference_legend(methods))
        layout = " One row per method, full rank (near-black) in every panel, axes shared per column."
    else:
        figure = style.new_figure(style.PANEL_HEIGHT + style.FOOTER_HEIGHT)
        for ax, (column, ylabel) in zip(figure.subplots(1, 2), columns):
            if column not in ccbh.columns or not finite(ccbh[column]).any():
                no_data(ax, f"no {column} values")
                continue
            mean_band(ax, ccbh[finite(ccbh[column])], x, column, methods, marker="o")
            step_axis(ax)
            ax.set_xlabel("training step (later checkpoint of the pair)")
            ax.set_ylabel(ylabel)
            ax.axhline(0.0, color="#999999", linewidth=0.6)
            ax.set_title(column.replace("_", " "))
        method_legend(figure, methods)
        layout = ""
    figure.suptitle(title)
    caption = "Barrier of the straight path between consecutive checkpoints, in each method's native parameters." + layout
    if not not_applicable.empty:
        caption += f" Not applicable: {', '.join(sorted(set(not_applicable['run'])))}."
    caption += seed_note(ccbh)
    return FigureResult(name, title, caption, save_figure(figure, out_dir, name))


def imbh_matrix(interpolation: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Methods, mean IMBH barrier between each pair of methods at each run's final step (mean over
    the seed pairs; the barrier is symmetric in the two ends), and a matrix of cell states:
    1 = value, 0 = not applicable, -1 = not computed. Two methods are compared on runs of the same
    seed; the diagonal holds runs of one method and different seeds (full rank: the seed baseline)."""
    imbh = interpolation[interpolation["kind"] == "imbh"].copy()
    if "other_run" in imbh.columns:  # a run interpolated with itself (barrier 0) is a check, not a pair
        imbh = imbh[imbh["other_run"].astype(str) != imbh["run"].astype(str)]
    if "pairing" in imbh.columns:  # tables from before the column hold same-seed pairs only
        same_method = imbh["method"].astype(str) == imbh["other_method"].astype(str)
        pairing = imbh["pairing"].astype(str)
        imbh = imbh[(same_method & (pairing == "cross-seed")) | (~same_method & pairing.isin(["same-seed", "nan", ""]))]
    imbh["step"] = pd.to_numeric(imbh["step"], errors="coerce")
    imbh = imbh[imbh["step"] == imbh.groupby("run")["step"].transform("max")]
    imbh["barrier"] = pd.to_numeric(imbh["barrier"], errors="coerce")
    imbh["ok"] = applicable_mask(imbh)
    methods = sorted_methods(set(imbh["method"]) | set(imbh["other_method"].dropna().astype(str)))
    index = {m: i for i, m in enumerate(methods)}
    values = np.full((len(methods), len(methods)), np.nan)
    state = np.full((len(methods), len(methods)), -1)
    sums: dict[tuple[int, int], list[float]] = {}
    for row in imbh.itertuples(index=False):
        other = str(row.other_method)
        if other not in index:
            continue
        i, j = sorted((index[str(row.method)], index[other]))
        if row.ok and np.isfinite(row.barrier):
            sums.setdefault((i, j), []).append(float(row.barrier))
        elif state[i, j] != 1:
            state[i, j] = state[j, i] = 0
    for (i, j), barriers in sums.items():
        values[i, j] = values[j, i] = float(np.mean(barriers))
        state[i, j] = state[j, i] = 1
    return methods, values, state


def fig_imbh(study: Study, preset: str, out_dir: Path, **_) -> FigureResult:
    name, title = f"imbh_{preset}", f"Inter-method barrier height (IMBH), final step ({preset})"
    table = preset_table(study, "interpolation", preset)
    if table is None or not (table["kind"] == "imbh").any():
        return FigureResult(name, title, skipped=f"no IMBH rows in interpolation.csv for preset {preset}")
    methods, values, state = imbh_matrix(table)
    # A square matrix: cells of ~0.6 inch up to the page width (the colourbar takes the rest).
    size = min(style.FIGURE_WIDTH - 1.6, 1.4 + 0.6 * len(methods))
    figure = style.new_figure(size + style.FOOTER_HEIGHT, size + 1.6)
    ax = figure.subplots()
    ax.grid(False)
    present = values[np.isfinite(values)]
    vmin, vmax = (float(present.min()), float(present.max())) if present.size else (0.0, 1.0)
    if vmax <= vmin:
        vmax = vmin + 1e-12
    cmap = matplotlib.colormaps["viridis"]
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax)
    for i in range(len(methods)):
        for j in range(len(methods)):
            if state[i, j] == 1:
                shade = (values[i, j] - vmin) / (vmax - vmin)
                ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=style.FONT["annotation"],
                        color="white" if shade < 0.55 else "black")
                continue
            hatch = "///" if state[i, j] == 0 else None
            ax.add_patch(matplotlib.patches.Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#EEEEEE",
                                                      edgecolor="#AAAAAA", hatch=hatch, linewidth=0.5))
            ax.text(j, i, "n/a" if state[i, j] == 0 else "—", ha="center", va="center", fontsize=style.FONT["annotation"],
                    color="#444444")
    ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right")
    ax.set_yticks(range(len(methods)), methods)
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for label, method in zip(labels, methods):
            label.set_color(method_color(method))
    ax.spines[["top", "right"]].set_visible(True)
    colorbar = figure.colorbar(image, ax=ax, shrink=0.85)
    colorbar.set_label("barrier height [nats], mean over seed pairs")
    ax.set_title(title)
    legend = [Patch(facecolor="#EEEEEE", edgecolor="#AAAAAA", hatch="///", label="n/a: not applicable"),
              Patch(facecolor="#EEEEEE", edgecolor="#AAAAAA", label="—: not computed")]
    style.legend(figure, legend)
    caption = ("Barrier on the straight path between two runs at the final step, interpolated in dense space. "
               "Off the diagonal: runs of the same seed; diagonal: same method, different seeds (full-rank: the seed "
               "baseline). n/a (hatched): a method without a dense equivalent; —: pair not computed.")
    return FigureResult(name, title, caption, save_figure(figure, out_dir, name))


def fig_imbh_to_full(study: Study, preset: str, out_dir: Path, baselines: SeedBaselines | None = None, **_) -> FigureResult:
    name, title = f"imbh_to_full_{preset}", f"IMBH to full rank against the full-rank seed baseline, final step ({preset})"
    baselines = baselines or SeedBaselines(study)
    final = baselines.final
    final = final[(final["preset"].astype(str) == str(preset)) & (final["measure"] == "imbh_to_full")]
    table = preset_table(study, "interpolation", preset)
    if table is None or not (table["kind"] == "imbh").any():
        return FigureResult(name, title, skipped=f"no IMBH rows in interpolation.csv for preset {preset}")
    imbh = table[table["kind"] == "imbh"]
    methods = [m for m in sorted_methods(imbh["method"].unique()) if m != REFERENCE_METHOD]
    if not methods:
        return FigureResult(name, title, skipped=f"no low-rank run has IMBH rows at preset {preset}")
    baseline = baselines.final_baseline(preset, "imbh_to_full")
    figure = style.new_figure(style.PANEL_HEIGHT + style.FOOTER_HEIGHT + 0.4)
    ax = figure.subplots()
    color = method_color(REFERENCE_METHOD)
    if baseline.n:
        ax.axhspan(baseline.low, baseline.high, color=color, alpha=style.BAND_ALPHA, linewidth=0, zorder=1)
        ax.axhline(baseline.mean, color=color, linestyle=":", linewidth=1.6, zorder=2)
    offsets = {"same-seed": -0.12, "cross-seed": 0.12}
    for index, method in enumerate(methods):
        mine = final[final["method"] == method]
        if mine.empty:
            ax.text(index, 0.04, "n/a", ha="center", va="bottom", fontsize=style.FONT["annotation"], color="#444444",
                    transform=blended_transform_factory(ax.transData, ax.transAxes))
            continue
        for pairing, offset in offsets.items():
            values = mine[mine["pairing"] == pairing]["value"].to_numpy(dtype=float)
            if values.size:
                ax.scatter(np.full(values.size, index + offset), values, s=28, zorder=3, linewidths=1.3,
                           color=method_color(method) if pairing == "same-seed" else "none",
                           edgecolors=method_color(method))
                ax.plot([index + offset - 0.08, index + offset + 0.08], [values.mean()] * 2, color=method_color(method),
                        linewidth=line_width(method), zorder=3)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    for label, method in zip(ax.get_xticklabels(), methods):
        label.set_color(method_color(method))
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_ylabel("barrier height [nats]")
    ax.set_title(f"IMBH to full rank, final step ({preset})")
    legend = [Line2D([], [], marker="o", linestyle="", color="#555555", label="same seed"),
              Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="#555555", label="other seed")]
    if baseline.n:
        legend += [Patch(facecolor=color, alpha=style.BAND_ALPHA, label=f"seed baseline ({SPREAD}, {len(set(baseline.pairs))} pairs)"),
                   Line2D([], [], color=color, linestyle=":", label="seed baseline mean")]
    style.legend(figure, legend)
    caption = ("Barrier on the straight path (dense space) between each low-rank run and a full-rank run at the last "
               "step: filled, the full-rank run of the same seed; hollow, the full-rank runs of the other seeds (short "
               f"bar: mean). Grey band: the barrier between full-rank runs of different seeds ({SPREAD}; dotted: "
               "mean). n/a: no dense equivalent.")
    if baseline.missing:
        caption += f" No seed-baseline band: {baseline.missing}."
    return FigureResult(name, title, caption, save_figure(figure, out_dir, name))
