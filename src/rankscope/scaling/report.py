"""The scaling report: fitted laws, compute-optimal exponents, dense vs low-rank frontiers.

Written as OUT/report.md and a self-contained OUT/report.html (figures embedded), with the
document model and renderers of the study report, so both read alike.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from rankscope.report.collect import sorted_methods
from rankscope.report.document import Document, render_html, render_markdown
from rankscope.report.stats import format_number
from rankscope.scaling.fit import PARAMETERS, FitSettings, MethodFit

LABELS = {"E": "E", "A": "A", "alpha": "α", "B": "B", "beta": "β"}


def _with_interval(value: float, ci) -> str:
    if ci is None or ci[0] is None or any(isinstance(v, float) and math.isnan(v) for v in ci):
        return format_number(value)
    return f"{format_number(value)} [{format_number(ci[0])}, {format_number(ci[1])}]"


def laws_table(fits_json: dict, fits: dict[str, MethodFit]) -> pd.DataFrame:
    rows = []
    for method in sorted_methods(fits_json):
        entry = fits_json[method]
        rows.append({"method": method, "runs": fits[method].n_runs,
                     **{LABELS[p]: _with_interval(entry[p], entry["ci"][p]) for p in PARAMETERS}})
    return pd.DataFrame(rows)


def exponents_table(optimal: dict) -> pd.DataFrame:
    rows = []
    for method in sorted_methods(optimal):
        info = optimal[method]
        train, inference = info["train_flops_per_token"], info["inference_flops_per_token"]
        rows.append({
            "method": method, "a (N* ∝ C^a)": _with_interval(info["a"], info["a_ci"]),
            "b (D* ∝ C^b)": _with_interval(info["b"], info["b_ci"]),
            "training FLOPs/token": f"{format_number(train['k'])}·N^{format_number(train['gamma'])}"
                                    + ("" if train["source"] == "measured" else f" ({train['source']})"),
            "inference FLOPs/token": f"{format_number(inference['k'])}·N^{format_number(inference['gamma'])}"
                                     + ("" if inference["source"] == "measured" else f" ({inference['source']})"),
        })
    return pd.DataFrame(rows)


def runs_table(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for method in sorted_methods(table["method"].unique()):
        mine = table[table["method"] == method]
        rows.append({"method": method, "runs": len(mine), "sizes": mine["params"].nunique(),
                     "token budgets": mine["tokens"].nunique(),
                     "params": f"{format_number(mine['params'].min())} – {format_number(mine['params'].max())}",
                     "tokens": f"{format_number(mine['tokens'].min())} – {format_number(mine['tokens'].max())}",
                     "loss": f"{format_number(mine['loss'].min())} – {format_number(mine['loss'].max())}"})
    return pd.DataFrame(rows)


def _verdict(row) -> str:
    if not (math.isfinite(row["loss"]) and math.isfinite(row["full loss"])):
        return "not defined (no compute-optimal size)"
    low, high = row["difference_low"], row["difference_high"]
    if any(isinstance(v, float) and math.isnan(v) for v in (low, high)):
        return "no interval (no bootstrap)"
    if high < 0:
        return "below full"
    if low > 0:
        return "above full"
    return "not distinguishable"


def comparison_display(comparison: pd.DataFrame) -> pd.DataFrame:
    if comparison.empty:
        return comparison
    shown = comparison.copy()
    shown["verdict"] = shown.apply(_verdict, axis=1)
    shown["loss − full"] = [_with_interval(d, (lo, hi)) for d, lo, hi in
                            zip(shown["difference"], shown["difference_low"], shown["difference_high"])]
    shown["C [FLOPs]"] = shown["compute"].map(format_number)
    shown["range"] = shown["extrapolated"].map({True: "extrapolated", False: "measured"})
    return shown[["C [FLOPs]", "range", "method", "loss", "full loss", "loss − full", "verdict",
                  "params / full", "inference cost / full"]]


def frontier_words(comparison: pd.DataFrame) -> list[str]:
    """One sentence per low-rank method: its frontier against full-rank's at the largest measured
    budget and at the largest budget of the table (an extrapolation)."""
    if comparison.empty:
        return ["No full-rank (`full`) runs in the table: the low-rank frontiers have no dense reference."]
    lines = []
    for method in sorted_methods(comparison["method"].unique()):
        mine = comparison[comparison["method"] == method].sort_values("compute")
        measured = mine[~mine["extrapolated"]]
        picks = [("at the largest measured budget", measured.iloc[-1])] if len(measured) else []
        if mine["extrapolated"].iloc[-1]:
            picks.append(("extrapolated to", mine.iloc[-1]))
        parts = []
        for words, row in picks:
            parts.append(f"{words} C = {format_number(row['compute'])} FLOPs its compute-optimal model is "
                         f"{_verdict(row)} (loss {format_number(row['loss'])} vs {format_number(row['full loss'])}, "
                         f"difference {_with_interval(row['difference'], (row['difference_low'], row['difference_high']))}) "
                         f"at {format_number(row['inference cost / full'])}x full-rank's inference FLOPs per token")
        lines.append(f"**{method}**: " + "; ".join(parts) + ".")
    return lines


def identification_notes(fits_json: dict, table: pd.DataFrame) -> list[str]:
    """Plain words where a parameter is not pinned down by the runs."""
    notes = []
    for method in sorted_methods(fits_json):
        entry, losses = fits_json[method], table.loc[table["method"] == method, "loss"]
        for name, variable in (("alpha", "N"), ("beta", "D")):
            if not entry[name] > 0:
                notes.append(f"{method}: {LABELS[name]} = {format_number(entry[name])}: its loss does not fall with {variable} "
                             "over these runs, so the law has no compute-optimal size (frontier not defined).")
        if entry["E"] < 1e-3 * float(losses.min()):
            notes.append(f"{method}: E is driven to ~0 ({format_number(entry['E'])}): its runs are far above the "
                         "irreducible loss, so they do not identify it, and the exponents absorb the curvature.")
        for name in ("alpha", "beta"):
            low, high = entry["ci"][name]
            if low is not None and high - low > entry[name]:
                notes.append(f"{method}: the interval of {LABELS[name]} is wider than its value "
                             f"({_with_interval(entry[name], (low, high))}): more sizes or budgets are needed to pin it down.")
    return notes


def write_report(out: Path, title: str, table: pd.DataFrame, fits: dict[str, MethodFit], fits_json: dict,
                 optimal: dict, front_plot: pd.DataFrame, comparison: pd.DataFrame, settings: FitSettings,
                 notes: list[str] | None = None) -> Path:
    from rankscope.scaling.figures import render

    laws = {method: fit.law.params() for method, fit in fits.items()}
    figures = render(table, laws, optimal, front_plot, out / "figures")
    document = Document()
    document.paragraph(
        f"L(N, D) = E + A/N^α + B/D^β fitted per method by Hoffmann et al. (2022)'s approach 3 as re-derived by "
        f"Besiroglu et al. (2024): Huber loss (δ = {settings.huber_delta:g}) on log-loss summed over runs, L-BFGS from "
        f"{len(settings.starts())} initialisations, the best kept. Intervals: {settings.confidence:.0%} percentile "
        f"intervals of {settings.bootstrap} bootstrap resamples of the runs. N counts parameters as the table gives "
        "them; compute C = training FLOPs per token of the method's model x tokens.")
    document.bullets(list(notes or []))
    document.heading("Runs")
    document.table(runs_table(table))
    document.heading("Fitted laws")
    document.table(laws_table(fits_json, fits), "Point estimate [interval]; also in fits.json.")
    document.bullets(identification_notes(fits_json, table))
    document.heading("Compute-optimal allocation")
    document.paragraph("Along C = k·N^γ·D (k, γ fitted to the methods' measured FLOPs per token), N*(C) = G·C^a with "
                       "a = β/(α + γβ) and D*(C) ∝ C^(1 − γa); for dense models with F = 6N this is Chinchilla's "
                       "a = β/(α + β).")
    document.table(exponents_table(optimal))
    document.heading("Dense and low-rank frontiers")
    document.bullets(frontier_words(comparison))
    display = comparison_display(comparison)
    if len(display):
        display.to_csv(out / "frontier_vs_full.csv", index=False)
        document.table(display, "Predicted loss of each method's compute-optimal model minus full-rank's at the same "
                                "compute, with its bootstrap interval; 'below full' only where the interval excludes 0.")
    for figure in figures:
        document.figure(figure)
    text_title = f"rankscope scaling report — {title}"
    (out / "report.md").write_text(render_markdown(document, text_title))
    (out / "report.html").write_text(render_html(document, text_title))
    return out / "report.html"
