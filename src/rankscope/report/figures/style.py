"""The report's figure style: sizes, fonts, colours and where legends go. Every figure module
draws through this module, so a change of page width or font is one edit here.

The report page is ~1150 px wide (report.html: ``body { max-width: 1150px }`` next to the
contents, images at most 100 % wide). A figure saved at ``FIGURE_WIDTH`` inches and ``DPI`` is exactly that wide, so the
browser shows it 1:1 and a 9-pt tick label is ~15 px on screen; a wider figure would be shrunk
and its text with it (the reason the old 2,000-px figures were unreadable).

API (stable; other figure modules, e.g. a new heatmap, need only this):

- sizes: ``DPI``, ``PAGE_WIDTH_PX``, ``FIGURE_WIDTH`` (inches), ``PANEL_HEIGHT`` (one ordinary
  panel), ``ROW_HEIGHT`` (one row of small multiples), ``MAP_PANEL`` (one 2-D map, ≥ 350 px),
  ``GRID_PANEL`` / ``GRID_PANEL_HEIGHT`` (one panel of a grid with one panel per method);
  ``new_figure(height, width=FIGURE_WIDTH)`` -> an Agg ``Figure`` with constrained layout;
  ``panel_columns(n)`` -> columns of a grid of n equal panels (2-D maps).
- fonts: ``FONT`` (keys title, panel_title, label, tick, legend, annotation; points) and ``RC``
  (the rcParams every figure is drawn under: ``with matplotlib.rc_context(RC): ...``).
- colours: ``method_color(method)``, ``palette(methods)``, ``METHOD_COLORS``, ``REFERENCE_COLOR``
  (full rank, always near-black), ``CONTROL_COLOR``; ``line_style(method)`` (controls dashed),
  ``line_width(method)``, ``BAND_ALPHA``; ``SEQUENTIAL_CMAP`` / ``DIVERGING_CMAP`` for maps.
- small multiples: ``MAX_METHODS_IN_ONE_AXES``: above it, one panel (row) per method, full rank
  drawn in every panel; ``use_small_multiples(methods)`` decides.
- legends: ``legend(figure, handles, title=None)``: below the plotting area, outside every axes
  and far from the title (``loc="outside lower center"`` under constrained layout), as many
  columns as fit the width. A legend at the upper right collided with long titles.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rankscope.report.collect import REFERENCE_METHOD, is_control

# --- sizes ------------------------------------------------------------------------------------

PAGE_WIDTH_PX = 1140  # the report's content column next to its table of contents (document.py's CSS)
DPI = 120
FIGURE_WIDTH = PAGE_WIDTH_PX / DPI  # inches; shown 1:1 in the report page
PANEL_HEIGHT = 3.2    # inches: one ordinary panel (a row of 1-3 panels across the page)
ROW_HEIGHT = 1.15     # inches: one method's row of small multiples
MAP_PANEL = 3.3       # inches: one 2-D map (3 columns across the page: ~380 px each)
GRID_PANEL = 2.4      # inches: least width of one panel in a grid of one quantity per method (4 columns)
GRID_PANEL_HEIGHT = 2.0
HEADER_HEIGHT = 0.9   # inches: suptitle + column titles above a grid
FOOTER_HEIGHT = 0.9   # inches: x label + a legend of one or two rows below a grid

# More methods than this in one axes cannot be told apart (ten lines and bands overlap): the
# figure switches to one panel per method.
MAX_METHODS_IN_ONE_AXES = 4

# --- fonts ------------------------------------------------------------------------------------

FONT = {"title": 12.0, "panel_title": 10.5, "label": 10.0, "tick": 9.0, "legend": 9.0, "annotation": 8.5}

RC = {
    "font.size": FONT["label"], "figure.titlesize": FONT["title"], "figure.labelsize": FONT["label"],
    "axes.titlesize": FONT["panel_title"], "axes.labelsize": FONT["label"], "legend.fontsize": FONT["legend"],
    "legend.title_fontsize": FONT["legend"], "xtick.labelsize": FONT["tick"], "ytick.labelsize": FONT["tick"],
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "figure.dpi": DPI, "savefig.dpi": DPI, "axes.formatter.useoffset": False,
}

# --- colours ----------------------------------------------------------------------------------

REFERENCE_COLOR = "#222222"  # full rank: the reference every other line is read against
CONTROL_COLOR = "#8A8A8A"    # the frozen control: grey, and dashed (line_style)


def _declared_colors() -> dict[str, str]:
    """Each registered method's own colour (``Method.color``; Okabe–Ito first, colour-blind safe)."""
    from rankscope import methods

    colors = {}
    for name in methods.names():
        color = getattr(methods.get(name), "color", None)
        if color:
            colors[name] = color
    return colors


METHOD_COLORS: dict[str, str] = {**_declared_colors(), REFERENCE_METHOD: REFERENCE_COLOR}
# Methods without a declared colour (new registry entries) get one of these, chosen by a hash of the
# name, so the colour is the same in every figure and every report without any shared state.
_EXTRA_COLORS = ["#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#17BECF", "#BCBD22", "#E377C2"]
BAND_ALPHA = 0.18
SEQUENTIAL_CMAP = "viridis"
DIVERGING_CMAP = "RdBu_r"


def method_color(method: str) -> str:
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    digest = int(hashlib.sha1(str(method).encode()).hexdigest(), 16)
    return _EXTRA_COLORS[digest % len(_EXTRA_COLORS)]


def palette(methods: Sequence[str]) -> dict[str, str]:
    """The colour of each method (the same mapping every figure uses)."""
    return {m: method_color(m) for m in methods}


def line_width(method: str) -> float:
    return 2.2 if method == REFERENCE_METHOD else 1.6


def line_style(method: str) -> str:
    """Dashed for a control, so its line reads as a yardstick next to the methods' solid ones."""
    return "--" if is_control(method) else "-"


# --- layout -----------------------------------------------------------------------------------


def new_figure(height: float, width: float = FIGURE_WIDTH) -> Figure:
    """An Agg figure (pyplot is never used: building a report leaves the caller's backend alone)
    with constrained layout, which keeps titles, labels and outside legends apart."""
    figure = Figure(figsize=(width, height), layout="constrained", dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def use_small_multiples(methods: Sequence[str]) -> bool:
    return len(list(methods)) > MAX_METHODS_IN_ONE_AXES


def panel_columns(count: int, min_width: float = MAP_PANEL) -> int:
    """Columns for a grid of `count` equal panels, each at least `min_width` inches wide, with the
    rows as full as possible (11 panels at 3 columns: 4 rows)."""
    most = max(1, int(FIGURE_WIDTH // min_width))
    if count <= most:
        return max(count, 1)
    rows = math.ceil(count / most)
    return math.ceil(count / rows)


def legend(figure, handles: Sequence, title: str | None = None):
    """The one legend placement: below the plotting area (constrained layout reserves the room),
    so it never covers a curve, a panel or the title."""
    handles = list(handles)
    longest = max((len(str(h.get_label())) for h in handles), default=10)
    # ~0.075 inch per character at the legend font, plus the handle; as many columns as fit.
    per_column = 0.075 * FONT["legend"] / 9.0 * longest + 0.9
    columns = max(1, min(len(handles), int(figure.get_figwidth() // per_column)))
    return figure.legend(handles=handles, loc="outside lower center", ncol=columns, title=title, frameon=False)
