"""The tune stage's figure: the tuning metric against the learning rate, one line per method, the
chosen point marked (per preset). Reads STUDY_DIR/tune/results.csv and tune/chosen.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from rankscope.report.collect import sorted_methods, sorted_presets
from rankscope.report.figures.base import FigureResult, _method_legend, _new_figure, _save, method_color

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


def fig_tuning(study_dir: Path, out_dir: Path) -> list[FigureResult]:
    import matplotlib as mpl

    from rankscope.report.figures.base import STYLE

    with mpl.rc_context(STYLE):
        return _fig_tuning(study_dir, out_dir)


def _fig_tuning(study_dir: Path, out_dir: Path) -> list[FigureResult]:
    data = read_tuning(study_dir)
    if data is None:
        return []
    frame, chosen = data
    cells = chosen.get("cells", [])
    results = []
    for preset in sorted_presets({str(c["preset"]) for c in cells}):
        name, title = f"tuning_{preset}", f"Tuning: {chosen.get('metric', 'val_loss')} vs learning rate ({preset})"
        here = {c["method"]: c for c in cells if str(c["preset"]) == preset}
        if frame.empty:
            results.append(FigureResult(name, title, skipped="tune/results.csv has no runs"))
            continue
        figure = _new_figure(8, 4.5)
        ax = figure.subplots()
        drawn, top = [], -math.inf
        curves = {m: tuning_curve(frame, here[m], chosen.get("seeds", [0])) for m in sorted_methods(here)}
        for curve in curves.values():
            finite = curve.loc[~curve["diverged"], "score"]
            top = max(top, finite.max() if len(finite) else -math.inf)
        for method, curve in curves.items():
            if curve.empty:
                continue
            color = method_color(method)
            ok = curve[~curve["diverged"]]
            ax.plot(ok["x"], ok["score"], color=color, marker="o", markersize=3.5, linewidth=1.5)
            bad = curve[curve["diverged"]]
            if len(bad) and math.isfinite(top):
                ax.scatter(bad["x"], [top] * len(bad), color=color, marker="x", s=40, zorder=4)
            values = here[method].get("values") or {}
            key = x_key(here[method])
            if key in values:
                at = ok[np.isclose(ok["x"], float(values[key]))]
                if len(at):
                    ax.scatter(at["x"], at["score"], color=color, marker="*", s=180, edgecolor="black",
                               linewidth=0.8, zorder=5)
            drawn.append(method)
        ax.set_xscale("log")
        keys = {x_key(c) for c in here.values()}
        ax.set_xlabel("learning rate" if keys == {LR_KEY} else " / ".join(sorted(k for k in keys if k)))
        ax.set_ylabel(f"{chosen.get('metric', 'val_loss')} (mean over seeds {chosen.get('seeds')})")
        ax.set_title(title)
        _method_legend(figure, drawn)
        _save(figure, out_dir, name)
        caption = ("One line per method over the values tried (grid and edge extensions), each point the mean over "
                   "the grid's seeds; ★ the chosen value (best mean over all its seeds, refinement seeds included, "
                   "see the table); × a run that diverged, drawn at the top of the axis. Other tuned "
                   "hyper-parameters are held at their chosen values.")
        results.append(FigureResult(name, title, caption, out_dir / f"{name}.png"))
    return results
