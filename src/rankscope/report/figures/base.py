"""What every figure of the report shares: one colour per method, the style, the `FigureResult`
a figure function returns, and the small drawing helpers (mean line ± seed band, step axes,
'no data' panels).

Conventions kept by every figure:
- one fixed colour per method, from `method_color` (full-rank always near-black), in every
  figure and legend, so a reader learns the colours once;
- a control (`frozen`) is a grey dashed line (`line_style`) labelled "(control)": a yardstick
  for the regime, never read as one more method;
- lines are the mean over seeds; the band (fill_between) or error bar is ± one sample standard
  deviation over seeds, drawn only where at least two seeds exist;
- axes carry names and units; a figure without data is not drawn: its function returns a
  `FigureResult` with `skipped` saying why, and the report prints that line.

Figures use the Agg canvas; pyplot is never used, so building a report does not change the
backend of the caller's session.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

from rankscope.report.collect import REFERENCE_METHOD, Study, finite, is_control, method_label

# --- colours ----------------------------------------------------------------------------------

# Okabe–Ito (colour-blind safe) first, then distinct extras; full-rank is the near-black reference.
METHOD_COLORS: dict[str, str] = {
    "full": "#222222",
    "galore": "#0072B2",
    "fira": "#009E73",
    "cola": "#D55E00",
    "sltrain": "#CC79A7",
    "relora": "#E69F00",
    "lora": "#56B4E9",
    "loro": "#7B3FA0",
    "lowrank": "#8C564B",
    "spectron": "#A6A614",
    "frozen": "#8A8A8A",  # the control: grey, and dashed (line_style)
}
# Methods not listed above (new registry entries) get one of these, chosen by a hash of the
# name, so the colour is the same in every figure and every report without any shared state.
_EXTRA_COLORS = ["#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#17BECF", "#BCBD22", "#E377C2"]


def method_color(method: str) -> str:
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    digest = int(hashlib.sha1(str(method).encode()).hexdigest(), 16)
    return _EXTRA_COLORS[digest % len(_EXTRA_COLORS)]


def palette(methods: Sequence[str]) -> dict[str, str]:
    """The colour of each method (the same mapping every figure uses)."""
    return {m: method_color(m) for m in methods}


def _line_width(method: str) -> float:
    return 2.2 if method == REFERENCE_METHOD else 1.6


def line_style(method: str) -> str:
    """Dashed for a control, so its line reads as a yardstick next to the methods' solid ones."""
    return "--" if is_control(method) else "-"


STYLE = {
    "font.size": 10, "axes.titlesize": 10.5, "axes.labelsize": 10, "legend.fontsize": 9,
    "xtick.labelsize": 8.5, "ytick.labelsize": 8.5, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 110, "savefig.dpi": 110,
    "axes.formatter.useoffset": False,
}
SCORE_COLORS = {"r2_in_sample": "#4C72B0", "loso_pearson": "#DD8452", "lomo_pearson": "#55A868"}
SCORE_LABELS = {"r2_in_sample": "in-sample R²", "loso_pearson": "LOSO Pearson r", "lomo_pearson": "LOMO Pearson r"}


@dataclass
class FigureResult:
    name: str                 # file stem under report/figures/
    title: str
    caption: str = ""
    path: Path | None = None
    skipped: str | None = None  # why the figure was not drawn


# --- helpers ----------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    figure.savefig(path)
    return path


def _step_label(step: float) -> str:
    step = float(step)
    if abs(step) >= 1000:
        text = f"{step / 1000:.1f}".rstrip("0").rstrip(".")
        return f"{text}k"
    return f"{step:g}"


_STEP_FORMATTER = FuncFormatter(lambda value, _: _step_label(value))


def _step_axis(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.xaxis.set_major_formatter(_STEP_FORMATTER)
    ax.set_xlabel("training step")


def _method_legend(figure: Figure, methods: Sequence[str], extra: Sequence = ()) -> None:
    handles = [Line2D([], [], color=method_color(m), linewidth=_line_width(m), linestyle=line_style(m),
                      label=method_label(m)) for m in methods]
    figure.legend(handles=handles + list(extra), loc="outside right upper", title="method", frameon=False)


def _mean_band(ax, frame: pd.DataFrame, x: str, y: str, methods: Sequence[str], marker: str | None = None) -> list[str]:
    """Per method: the mean of `y` over seeds at each `x` as a line, ± std as a band. Returns the
    methods drawn."""
    drawn = []
    for method in methods:
        rows = frame[(frame["method"] == method) & finite(frame[y])]
        if rows.empty:
            continue
        stats = rows.groupby(x)[y].agg(["mean", "std", "count"]).reset_index().sort_values(x)
        color = method_color(method)
        ax.plot(stats[x], stats["mean"], color=color, linewidth=_line_width(method), linestyle=line_style(method),
                marker=marker, markersize=3.5, label=method_label(method),
                zorder=3 if method == REFERENCE_METHOD else 2)
        band = stats["count"] >= 2
        if band.any():
            ax.fill_between(stats.loc[band, x], (stats["mean"] - stats["std"])[band],
                            (stats["mean"] + stats["std"])[band], color=color, alpha=0.18, linewidth=0)
        drawn.append(method)
    _widen_flat_axis(ax)
    return drawn


def _widen_flat_axis(ax) -> None:
    """A y range that is flat to rounding (CKA of the reference with itself: 1 ± 1e-13) would
    get an offset label like '1e-12+1'; show it as a flat line at its value instead."""
    values = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()] or [np.zeros(0)])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    center, span = float(values.mean()), float(np.ptp(values))
    if center != 0 and span <= 1e-6 * abs(center):
        half = 0.05 * abs(center)
        ax.set_ylim(center - half, center + half)


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777777", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_color("#DDDDDD")


def _pick_checkpoints(steps: Sequence[int], count: int = 5) -> list[int]:
    """`count` checkpoints spread evenly over the available ones, always including the last."""
    steps = sorted(set(int(s) for s in steps))
    if len(steps) <= count:
        return steps
    picks = np.unique(np.round(np.linspace(0, len(steps) - 1, count)).astype(int))
    return [steps[i] for i in picks]


def _preset_runs(study: Study, preset: str) -> pd.DataFrame:
    return study.runs[study.runs["preset"].astype(str) == str(preset)]


def _table(study: Study, family: str, preset: str) -> pd.DataFrame | None:
    table = study.tables.get(family)
    if table is None:
        return None
    table = table[table["preset"].astype(str) == str(preset)]
    return table if not table.empty else None


def _seed_note(frame: pd.DataFrame) -> str:
    counts = frame.groupby("method")["seed"].nunique()
    if counts.empty:
        return ""
    if counts.max() < 2:
        return " One seed per method: no seed bands."
    seeds = f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()}–{counts.max()}"
    return f" Lines: mean over seeds; bands: ± 1 std over seeds ({seeds} seeds per method)."
