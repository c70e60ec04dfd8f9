"""The tune stage's figure: the tuning metric against the learning rate, one line per method, the
chosen point marked (per preset). Reads STUDY_DIR/tune/results.csv and tune/chosen.json.

Under the shared-dense protocol stage 1 searches full rank's lr jointly with one lr for the
embeddings, head and norms: a 2-D grid, drawn as one lr curve per dense lr value (the chosen
dense lr solid and marked, the others fainter). Stage 2's curves run at the dense lr stage 1 chose."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from rankscope.report.collect import (
    REFERENCE_METHOD,
    method_label,
    sorted_methods,
    sorted_presets,
)
from rankscope.report.figures import style
from rankscope.report.figures.base import (
    FigureResult,
    line_style,
    method_color,
    method_legend,
    save_figure,
)

LR_KEY = "optim.lr"


def read_tuning(study_dir: Path) -> tuple[pd.DataFrame, dict] | None:
    """(results.csv, chosen.json) of the study's tune stage; None when it has none."""
    tune_dir = Path(study_dir) / "tune"
    results, chosen = tune_dir / "results.csv", tune_dir / "chosen.json"
    if not results.is_file() or not chosen.is_file():
        return None
    try:
        frame = pd.read_csv(results)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    return frame, json.loads(chosen.read_text())


def x_key(row: dict) -> str | None:
    """The axis a cell's curve runs along: lr where it was tuned, else its first tuned key."""
    keys = sorted(row.get("defaults") or {})
    return LR_KEY if LR_KEY in keys else (keys[0] if keys else None)


def tuning_curve(frame: pd.DataFrame, row: dict, seeds: list[int]) -> pd.DataFrame:
    """One cell's points along its x key (the other keys at their chosen values): per value the
    mean score over the grid's seeds, with diverged runs as +inf."""
    key = x_key(row)
    rows = frame[(frame["method"] == row["method"]) & (frame["preset"].astype(str) == str(row["preset"]))
                 & frame["seed"].isin(seeds)]
    for other, value in (row.get("values") or {}).items():
        if other != key and other in rows.columns:
            rows = rows[np.isclose(rows[other].astype(float), float(value))]
    if key is None or rows.empty:
        return pd.DataFrame(columns=["x", "score", "diverged"])
    scores = np.where(rows["state"] == "diverged", np.inf, pd.to_numeric(rows["score"], errors="coerce"))
    curve = pd.DataFrame({"x": rows[key].astype(float).to_numpy(), "score": scores})
    grouped = curve.groupby("x")["score"].mean().reset_index().sort_values("x")
    grouped["diverged"] = ~np.isfinite(grouped["score"])
    return grouped


def dense_key(row: dict, dense_keys: list[str]) -> str | None:
    """The dense-lr axis of a stage-1 cell (its first tied key); None for every other cell."""
    if row.get("stage") != 1:
        return None
    return next((key for key in dense_keys if key in (row.get("defaults") or {})), None)


def tuning_curves(frame: pd.DataFrame, row: dict, seeds: list[int],
                  dense_keys: list[str] = ()) -> list[tuple[float | None, pd.DataFrame]]:
    """A cell's lr curves: one (None, curve) for a 1-D search; for a stage-1 cell one (dense lr,
    curve) per dense lr tried, each with the other keys at their chosen values."""
    key = dense_key(row, list(dense_keys))
    if key is None or key not in frame.columns:
        return [(None, tuning_curve(frame, row, seeds))]
    mine = frame[(frame["method"] == row["method"]) & (frame["preset"].astype(str) == str(row["preset"]))]
    curves = []
    for value in sorted(set(pd.to_numeric(mine[key], errors="coerce").dropna())):
        # The dense keys are tied to one value: every one of them takes this curve's.
        tied = {k: float(value) for k in dense_keys}
        at_value = {**row, "values": {**(row.get("values") or {}), **tied}}
        curves.append((float(value), tuning_curve(frame, at_value, seeds)))
    return curves


def fig_tuning(study_dir: Path, out_dir: Path) -> list[FigureResult]:
    import matplotlib as mpl

    with mpl.rc_context(style.RC):
        return _fig_tuning(study_dir, out_dir)


DENSE_MARKERS = ("o", "s", "^", "D", "v", "P")


def _fig_tuning(study_dir: Path, out_dir: Path) -> list[FigureResult]:
    data = read_tuning(study_dir)
    if data is None:
        return []
    frame, chosen = data
    cells = chosen.get("cells", [])
    dense_keys = list(chosen.get("dense_keys") or [])
    results = []
    for preset in sorted_presets({str(c["preset"]) for c in cells}):
        name, title = f"tuning_{preset}", f"Tuning: {chosen.get('metric', 'val_loss')} vs learning rate ({preset})"
        here = {c["method"]: c for c in cells if str(c["preset"]) == preset}
        if frame.empty:
            results.append(FigureResult(name, title, skipped="tune/results.csv has no runs"))
            continue
        curves = {m: tuning_curves(frame, here[m], chosen.get("seeds", [0]), dense_keys) for m in sorted_methods(here)}
        finite_scores = [c.loc[~c["diverged"], "score"] for per_method in curves.values() for _, c in per_method]
        top = max((s.max() for s in finite_scores if len(s)), default=-math.inf)
        keys = {x_key(c) for c in here.values()}
        xlabel = "learning rate" if keys == {LR_KEY} else " / ".join(sorted(k for k in keys if k))
        ylabel = f"{chosen.get('metric', 'val_loss')} (mean over seeds {chosen.get('seeds')})"
        if style.use_small_multiples(curves):
            figure, dense_handles = _tuning_grid(curves, here, dense_keys, top, xlabel, ylabel)
        else:
            figure = style.new_figure(style.PANEL_HEIGHT + style.FOOTER_HEIGHT + 0.6)
            ax = figure.subplots()
            drawn, dense_handles = [], []
            for method, per_method in curves.items():
                if _draw_method(ax, method, per_method, here[method], dense_keys, top, dense_handles):
                    drawn.append(method)
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            method_legend(figure, drawn, dense_handles)
        figure.suptitle(title)
        save_figure(figure, out_dir, name)
        caption = _caption(dense_handles, here)
        if style.use_small_multiples(curves):
            caption += (" One panel per method, axes shared; full rank's curve at its chosen dense lr in near-black in "
                        "every panel.")
        results.append(FigureResult(name, title, caption, out_dir / f"{name}.png"))
    return results


def _draw_method(ax, method: str, per_method, cell: dict, dense_keys: list[str], top: float,
                 dense_handles: list, alpha_scale: float = 1.0, chosen_only: bool = False) -> bool:
    """One method's lr curves (one per dense lr for a stage-1 cell; `chosen_only`: only the chosen
    one); the dense-lr legend entries go to `dense_handles`. Returns whether anything was drawn."""
    values = cell.get("values") or {}
    key = x_key(cell)
    chosen_dense = values.get(dense_key(cell, dense_keys))
    drawn = False
    for index, (dense_value, curve) in enumerate(per_method):
        if curve.empty:
            continue
        is_chosen = dense_value is None or (chosen_dense is not None and math.isclose(dense_value, chosen_dense))
        if chosen_only and not is_chosen:
            continue
        marker = "o" if dense_value is None else DENSE_MARKERS[index % len(DENSE_MARKERS)]
        alpha = (1.0 if is_chosen else 0.45) * alpha_scale
        _draw_curve(ax, curve, method, marker, alpha=alpha, top=top, chosen_x=values.get(key) if is_chosen else None)
        if dense_value is not None and not chosen_only:
            label = f"{method_label(method)}, dense lr {dense_value:g}" + (" (chosen)" if is_chosen else "")
            dense_handles.append(Line2D([], [], color=method_color(method), marker=marker, alpha=alpha, label=label))
        drawn = True
    return drawn


def _tuning_grid(curves: dict, cells: dict, dense_keys: list[str], top: float, xlabel: str, ylabel: str):
    """Small multiples: one panel per method (full rank's with all its dense-lr curves), full
    rank's chosen curve behind every other panel; x (log lr) and y shared."""
    methods = list(curves)
    columns = style.panel_columns(len(methods), min_width=style.GRID_PANEL)
    rows = -(-len(methods) // columns)
    figure = style.new_figure(style.HEADER_HEIGHT + style.FOOTER_HEIGHT + rows * style.GRID_PANEL_HEIGHT)
    axes = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
    dense_handles: list = []
    for index, ax in enumerate(axes.flat):
        if index >= len(methods):
            ax.set_visible(False)
            continue
        method = methods[index]
        if method != REFERENCE_METHOD and REFERENCE_METHOD in curves:
            _draw_method(ax, REFERENCE_METHOD, curves[REFERENCE_METHOD], cells[REFERENCE_METHOD], dense_keys, top, [],
                         alpha_scale=0.8, chosen_only=True)
        if not _draw_method(ax, method, curves[method], cells[method], dense_keys, top, dense_handles):
            ax.text(0.5, 0.5, "no finished run", ha="center", va="center", transform=ax.transAxes, color="#777777",
                    fontsize=style.FONT["annotation"])
        ax.set_title(method_label(method), color=method_color(method))
        ax.set_xscale("log")
    for column in range(columns):
        lowest = axes[(len(methods) - 1 - column) // columns, column]
        lowest.xaxis.set_tick_params(labelbottom=True)
        lowest.set_xlabel(xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel if ax is axes[rows // 2, 0] else "")
    handles = [Line2D([], [], color=style.REFERENCE_COLOR, marker="o", label="full rank (chosen dense lr), every panel"),
               Line2D([], [], color="#555555", marker="*", markersize=11, markeredgecolor="black", linestyle="",
                      label="chosen value"),
               Line2D([], [], color="#555555", marker="x", linestyle="", label="diverged (drawn at the top)")]
    style.legend(figure, handles + dense_handles)
    return figure, dense_handles


def _draw_curve(ax, curve: pd.DataFrame, method: str, marker: str, alpha: float, top: float,
                chosen_x: float | None) -> None:
    """One lr curve: its finished points, its diverged ones (×, at the top of the axis), and ★ at
    `chosen_x` when the choice lies on it."""
    color = method_color(method)
    ok = curve[~curve["diverged"]]
    ax.plot(ok["x"], ok["score"], color=color, marker=marker, markersize=3.5, linewidth=1.5,
            linestyle=line_style(method), alpha=alpha)
    bad = curve[curve["diverged"]]
    if len(bad) and math.isfinite(top):
        ax.scatter(bad["x"], [top] * len(bad), color=color, marker="x", s=40, zorder=4, alpha=alpha)
    if chosen_x is not None:
        at = ok[np.isclose(ok["x"], float(chosen_x))]
        if len(at):
            ax.scatter(at["x"], at["score"], color=color, marker="*", s=180, edgecolor="black", linewidth=0.8, zorder=5)


def _caption(dense_handles: list, cells: dict[str, dict]) -> str:
    caption = ("One line per method over the values tried (grid and edge extensions), each point the mean over "
               "the grid's seeds; ★ the chosen value (best mean over all its seeds, refinement seeds included, "
               "see the table); × a run that diverged, drawn at the top of the axis. Other tuned "
               "hyper-parameters are held at their chosen values.")
    if dense_handles:
        caption += (" Stage 1 (shared-dense protocol) searched full rank's lr jointly with one lr for the embeddings, "
                    "head and norms: one line per dense lr (markers in the legend), the chosen one solid.")
    if any(c.get("stage") == 2 for c in cells.values()):
        caption += " Stage 2's methods ran with the dense lr stage 1 chose."
    return caption
