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
  `FigureResult` with `skipped` saying why, and the report prints that line. Nor is a quantity
  with one x value per method (one checkpoint pair): dots joined by nothing are no curve;
- more than `style.MAX_METHODS_IN_ONE_AXES` methods are not drawn into one axes: each method gets
  a row of panels (`method_rows`) with full rank drawn in every panel, axes shared per column;
- sizes, fonts, colours and the legend placement come from :mod:`.style`.

Figures use the Agg canvas; pyplot is never used, so building a report does not change the
backend of the caller's session.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, FuncFormatter, MaxNLocator

from rankscope.report.collect import REFERENCE_METHOD, Study, finite, method_label
from rankscope.report.figures import style

# --- colours and style: owned by .style, re-exported here for the modules that import them ---

METHOD_COLORS = style.METHOD_COLORS
method_color = style.method_color
palette = style.palette
line_style = style.line_style
line_width = style.line_width
STYLE = style.RC
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


def sized_figure(width: float, height: float) -> Figure:
    """Kept for callers outside report/figures (dynamics, scaling); figure modules here use
    `style.new_figure`, which defaults to the page width. Never wider than the page: the browser
    would shrink the picture and its text with it."""
    return style.new_figure(height, min(width, style.FIGURE_WIDTH))


def save_figure(figure: Figure, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    figure.savefig(path)
    return path


def step_label(step: float) -> str:
    step = float(step)
    if abs(step) >= 1000:
        text = f"{step / 1000:.1f}".rstrip("0").rstrip(".")
        return f"{text}k"
    return f"{step:g}"


_STEP_FORMATTER = FuncFormatter(lambda value, _: step_label(value))


def step_axis(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.xaxis.set_major_formatter(_STEP_FORMATTER)
    ax.set_xlabel("training step")


def method_legend(figure: Figure, methods: Sequence[str], extra: Sequence = ()) -> None:
    handles = [Line2D([], [], color=method_color(m), linewidth=line_width(m), linestyle=line_style(m),
                      label=method_label(m)) for m in methods]
    style.legend(figure, handles + list(extra), title="method")


def mean_band(ax, frame: pd.DataFrame, x: str, y: str, methods: Sequence[str], marker: str | None = None,
               on_top: str = REFERENCE_METHOD) -> list[str]:
    """Per method: the mean of `y` over seeds at each `x` as a line, ± std as a band. `on_top` is
    drawn above the others (full rank in a shared axes; the panel's own method in small
    multiples, where full rank is the backdrop). Returns the methods drawn."""
    drawn = []
    for method in methods:
        rows = frame[(frame["method"] == method) & finite(frame[y])]
        if rows.empty:
            continue
        stats = rows.groupby(x)[y].agg(["mean", "std", "count"]).reset_index().sort_values(x)
        color = method_color(method)
        ax.plot(stats[x], stats["mean"], color=color, linewidth=line_width(method), linestyle=line_style(method),
                marker=marker, markersize=3.5, label=method_label(method),
                zorder=3 if method == on_top else 2)
        band = stats["count"] >= 2
        if band.any():
            ax.fill_between(stats.loc[band, x], (stats["mean"] - stats["std"])[band],
                            (stats["mean"] + stats["std"])[band], color=color, alpha=style.BAND_ALPHA, linewidth=0)
        drawn.append(method)
    widen_flat_axis(ax)
    return drawn


def widen_flat_axis(ax) -> None:
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


def no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777777",
            fontsize=style.FONT["annotation"])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_color("#DDDDDD")


def pick_checkpoints(steps: Sequence[int], count: int = 5) -> list[int]:
    """`count` checkpoints spread evenly over the available ones, always including the last."""
    steps = sorted(set(int(s) for s in steps))
    if len(steps) <= count:
        return steps
    picks = np.unique(np.round(np.linspace(0, len(steps) - 1, count)).astype(int))
    return [steps[i] for i in picks]


def preset_runs(study: Study, preset: str) -> pd.DataFrame:
    return study.runs[study.runs["preset"].astype(str) == str(preset)]


def preset_table(study: Study, family: str, preset: str) -> pd.DataFrame | None:
    table = study.tables.get(family)
    if table is None:
        return None
    table = table[table["preset"].astype(str) == str(preset)]
    return table if not table.empty else None


def seed_note(frame: pd.DataFrame) -> str:
    counts = frame.groupby("method")["seed"].nunique()
    if counts.empty:
        return ""
    if counts.max() < 2:
        return " One seed per method: no seed bands."
    seeds = f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()}–{counts.max()}"
    return f" Lines: mean over seeds; bands: ± 1 std over seeds ({seeds} seeds per method)."


# --- small multiples ----------------------------------------------------------------------------
# Ten methods' lines and bands in one axes cannot be read per method. Above
# style.MAX_METHODS_IN_ONE_AXES a figure gives every method its own row of panels (one column
# per quantity the figure shows), with full rank drawn in every panel as the backdrop it is read
# against, and shared axes per column so rows compare at a glance.


def panel_methods(methods: Sequence[str]) -> list[str]:
    """The methods that get a row: all but full rank, which is in every row (alone, it gets one)."""
    others = [m for m in methods if m != REFERENCE_METHOD]
    return others or list(methods)


def with_reference(method: str, methods: Sequence[str]) -> list[str]:
    """What one panel draws: full rank (when the study has it) and the panel's method."""
    if method == REFERENCE_METHOD or REFERENCE_METHOD not in methods:
        return [method]
    return [REFERENCE_METHOD, method]


def method_rows(figure: Figure, methods: Sequence[str], column_titles: Sequence[str],
                xlabels: Sequence[str] | str = "") -> tuple[list[str], np.ndarray]:
    """A grid of small multiples: one row per method (``panel_methods``), one column per entry of
    `column_titles`; axes shared per column. Returns (row methods, 2-D array of axes)."""
    rows = panel_methods(methods)
    axes = figure.subplots(len(rows), len(column_titles), sharex="col", sharey="col", squeeze=False)
    for column, title in enumerate(column_titles):
        axes[0, column].set_title(title)
        # Plain short numbers: an offset label ("1e-5") would repeat on every row and hit the
        # panel above.
        axes[0, column].yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        xlabel = xlabels if isinstance(xlabels, str) else xlabels[column]
        axes[-1, column].set_xlabel(xlabel)
    for row, method in enumerate(rows):
        # The row's name stands where a legend entry would, in the method's colour.
        axes[row, 0].set_ylabel(method_label(method).replace(" (", "\n("), color=method_color(method), rotation=0,
                                ha="right", va="center", fontsize=style.FONT["panel_title"])
    return rows, axes


def rows_height(methods: Sequence[str]) -> float:
    """Figure height for the small multiples of `methods` (one row each, full rank's folded in)."""
    return style.HEADER_HEIGHT + style.FOOTER_HEIGHT + style.ROW_HEIGHT * len(panel_methods(methods))


def reference_legend(methods: Sequence[str], band: str = "± 1 std over seeds", extra: Sequence = ()) -> list:
    """Legend of a small-multiples figure: what the reference line is and what the bands are (the
    methods are named by their rows)."""
    handles = []
    if REFERENCE_METHOD in methods:
        handles.append(Line2D([], [], color=style.REFERENCE_COLOR, linewidth=style.line_width(REFERENCE_METHOD),
                              label="full rank (reference, in every panel)"))
    handles.append(Line2D([], [], color="#777777", linewidth=1.6, label="the row's method (its colour)"))
    if band:
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor="#777777", alpha=style.BAND_ALPHA, label=f"band: {band}"))
    return handles + list(extra)


def draw_rows(axes_column, rows: Sequence[str], methods: Sequence[str],
              draw: Callable[[object, list[str], str], bool]) -> None:
    """Call `draw(ax, [full rank, method], method)` on each row's panel of one column; a panel
    with nothing drawn says so."""
    for ax, method in zip(axes_column, rows):
        if not draw(ax, with_reference(method, methods), method):
            # Text only: clearing this panel's ticks would clear the whole shared column's.
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="#777777",
                    fontsize=style.FONT["annotation"])


def single_valued(frame: pd.DataFrame, x: str) -> bool:
    """Whether every method has at most one distinct `x` (one checkpoint pair, one step): a line
    plot of such data shows one dot per method joined by nothing, so it is not drawn as one."""
    if frame.empty:
        return True
    return int(frame.groupby("method")[x].nunique().max()) <= 1
