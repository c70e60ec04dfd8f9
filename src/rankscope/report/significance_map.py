"""The significance map: every method against full rank on every metric in one grid, instead of a
sentence per method and a table per test.

A cell is a standardised difference d (Cohen's d with the two groups' pooled seed std):
- metrics of the test family (:func:`rankscope.report.significance.study_comparison`):
  d = (mean(method) − mean(full)) / √((s²_method + s²_full) / 2) over seeds, marked where the
  Holm-corrected Welch test separates the pair;
- distances to full rank (CKA, cosine, relative L2, IMBH), which are not tested against full rank's
  comparison with itself: d = (mean over the other-seed comparisons − seed-baseline mean) /
  √((s²_comparisons + s²_baseline) / 2), marked where the mean lies outside the seed baseline's
  range (a reading, not a test);
- grey where nothing can be read: fewer than 3 seeds (not testable), no values, no spread, or an
  estimate left out because it did not converge.
d is signed like the raw difference (a higher CKA is positive, and closer).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from rankscope.report.baseline import FINAL_MEASURES, SeedBaselines
from rankscope.report.collect import REFERENCE_METHOD, is_control, sorted_methods
from rankscope.report.stats import NO_SPREAD, NO_VALUES, NOT_TESTABLE, TESTED, format_number, format_p

SEPARATED, NOT_SEPARATED = "separated", "not separated"
OUTSIDE, INSIDE = "outside seed range", "within seed range"
NOT_CONVERGED = "not converged"
MARKS = {SEPARATED: "*", OUTSIDE: "◆"}
GREY = (NOT_TESTABLE, NO_VALUES, NO_SPREAD, NOT_CONVERGED, "baseline missing")
D_LIMIT = 3.0  # the colour scale saturates at |d| = 3: beyond it every difference reads as large
COLUMNS = ["preset", "method", "metric", "kind", "d", "difference", "p_adjusted", "n_method", "n_other", "cell", "reason"]


def pooled_d(difference: float, std_a: float, std_b: float) -> float:
    pooled = math.sqrt((std_a**2 + std_b**2) / 2) if np.isfinite(std_a) and np.isfinite(std_b) else math.nan
    return difference / pooled if pooled > 0 else math.nan


def _std(values: pd.Series) -> float:
    values = pd.to_numeric(values, errors="coerce").dropna()
    return float(values.std(ddof=1)) if len(values) >= 2 else math.nan


def significance_map(comparison: pd.DataFrame, features: pd.DataFrame, baselines: SeedBaselines, preset: str,
                     metrics: list[str], exclusions: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (method, metric) of one scale (long format, COLUMNS). ``metrics``: the columns in
    display order; ``exclusions`` (preset, method, metric, reason): estimates left out of the family."""
    in_preset = features[features["preset"].astype(str) == str(preset)]
    reference = comparison[(comparison["preset"].astype(str) == str(preset)) & (comparison["kind"] == "reference")]
    methods = [m for m in sorted_methods(in_preset["method"].dropna().unique())
               if m != REFERENCE_METHOD and not is_control(m)]
    excluded = {}
    if exclusions is not None and len(exclusions):
        for row in exclusions[exclusions["preset"].astype(str) == str(preset)].itertuples(index=False):
            excluded.setdefault((str(row.method), str(row.metric)), str(row.reason))
    final = baselines.final_table(preset) if not baselines.missing(preset) else None
    full = in_preset[in_preset["method"] == REFERENCE_METHOD]
    rows = []
    for method in methods:
        mine = in_preset[in_preset["method"] == method]
        for metric in metrics:
            row = {"preset": preset, "method": method, "metric": metric, "d": math.nan, "difference": math.nan,
                   "p_adjusted": math.nan, "n_method": 0, "n_other": 0, "reason": ""}
            if metric in FINAL_MEASURES:
                row.update(_distance_cell(final, baselines, preset, method, metric))
            else:
                row.update(_tested_cell(reference, mine, full, method, metric))
            reason = excluded.get((method, metric)) or excluded.get((REFERENCE_METHOD, metric))
            if reason and row["cell"] != SEPARATED:
                row.update(cell=NOT_CONVERGED, reason=reason)
            rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def _tested_cell(reference: pd.DataFrame, mine: pd.DataFrame, full: pd.DataFrame, method: str, metric: str) -> dict:
    match = reference[(reference["method"] == method) & (reference["metric"] == metric)]
    if match.empty:
        return {"kind": "test", "cell": NO_VALUES, "reason": "no values"}
    test = match.iloc[0]
    cell = {"kind": "test", "difference": float(test["difference"]), "n_method": int(test["n_method"]),
            "n_other": int(test["n_other"]), "p_adjusted": float(test["p_adjusted"])}
    if test["status"] != TESTED:
        return {**cell, "cell": test["status"], "reason": test["status"]}
    d = pooled_d(cell["difference"], _std(mine[metric]), _std(full[metric]))
    return {**cell, "d": d, "cell": SEPARATED if bool(test["separated"]) else NOT_SEPARATED}


def _distance_cell(final: pd.DataFrame | None, baselines: SeedBaselines, preset: str, method: str, metric: str) -> dict:
    if final is None:
        return {"kind": "distance", "cell": "baseline missing", "reason": baselines.missing(preset)}
    match = final[(final["method"] == method) & (final["metric"] == metric) & (final["pairing"] == "cross-seed")]
    if match.empty or not (match["n"] > 0).any():
        return {"kind": "distance", "cell": NO_VALUES, "reason": "no values"}
    row = match.iloc[0]
    baseline = baselines.final_baseline(preset, metric)
    difference = float(row["mean"]) - baseline.mean
    d = pooled_d(difference, float(row["std"]), baseline.std)
    return {"kind": "distance", "d": d, "difference": difference, "n_method": int(row["n"]), "n_other": baseline.n,
            "cell": OUTSIDE if str(row["reading"]) != "within seed baseline" else INSIDE,
            "reason": str(row["reading"])}


def _hex(rgba) -> str:
    return "#" + "".join(f"{int(round(255 * c)):02x}" for c in rgba[:3])


def colour(d: float, cell: str) -> str:
    """The cell's background: diverging blue (negative) / red (positive), pale when not separated."""
    if cell in GREY or not np.isfinite(d):
        return "#d9d9d9"
    from matplotlib import colormaps

    value = 0.5 + 0.5 * max(-1.0, min(1.0, d / D_LIMIT))
    rgba = colormaps["RdBu_r"](value)
    if cell in (NOT_SEPARATED, INSIDE):  # shown, but faded: not a finding
        rgba = tuple(0.3 * c + 0.7 for c in rgba[:3])
    return _hex(rgba)


def cell_text(cell: str, d: float) -> str:
    if cell in GREY:
        return {NOT_TESTABLE: "n.t.", NO_VALUES: "–", NO_SPREAD: "sd 0", NOT_CONVERGED: "n.c.",
                "baseline missing": "no baseline"}[cell]
    if not np.isfinite(d):
        return "–"
    return f"{d:+.1f}{MARKS.get(cell, '')}"


def map_display(cells: pd.DataFrame, labels: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table, CSS per cell) for the HTML report: methods as rows, metrics as columns."""
    metrics = list(dict.fromkeys(cells["metric"]))
    methods = list(dict.fromkeys(cells["method"]))
    table = pd.DataFrame({"method": methods})
    styles = pd.DataFrame({"method": [""] * len(methods)})
    for metric in metrics:
        column = cells[cells["metric"] == metric].set_index("method")
        label = labels.get(metric, metric)
        table[label] = [cell_text(column.loc[m, 'cell'], column.loc[m, 'd']) for m in methods]
        styles[label] = [f"background:{colour(column.loc[m, 'd'], column.loc[m, 'cell'])};text-align:center"
                         for m in methods]
    return table, styles


def describe_cell(row, labels: dict[str, str]) -> str:
    """One separated cell in words: metric, direction, effect size and its evidence."""
    label = labels.get(row.metric, row.metric)
    direction = "higher" if row.difference > 0 else "lower"
    if row.kind == "distance":
        return (f"{label} {direction} than between two full-rank seeds (Δ {format_number(row.difference, 3)}, "
                f"d = {row.d:+.1f}; {row.reason}, {row.n_method} comparisons vs {row.n_other} seed pairs)")
    return (f"{label} {direction} (Δ {format_number(row.difference, 3)}, d = {row.d:+.1f}, adj. p = "
            f"{format_p(row.p_adjusted)}, {row.n_method} vs {row.n_other} seeds)")


LEGEND = (f"d: standardised difference to full rank (difference of means / pooled seed std); {MARKS[SEPARATED]} "
          f"separated by the Holm-corrected Welch test; {MARKS[OUTSIDE]} a distance to full rank outside the range of "
          "the full-rank seed pairs (a reading against the seed baseline, not a test); faded: not separated / within "
          "the seed range; grey: n.t. not testable (< 3 seeds), n.c. estimate did not converge (left out), sd 0 no spread "
          "over seeds in either group (no t-test), – no values. "
          f"Colours saturate at |d| = {D_LIMIT:g}.")

__all__ = ["COLUMNS", "GREY", "INSIDE", "LEGEND", "NOT_CONVERGED", "NOT_SEPARATED", "OUTSIDE", "SEPARATED",
           "cell_text", "colour", "describe_cell", "map_display", "pooled_d", "significance_map"]
