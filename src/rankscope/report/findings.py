"""The report's findings: per question of the study (same solution as full rank? at what cost? does
perplexity predict downstream quality?), the statements its tests and tables support, each with its
effect size, adjusted p and seed count, and the table or figure it comes from.

Nothing is stated here that the tables do not: a difference is a finding only where the
Holm-corrected test separates it (:mod:`.significance_map`'s cells), a distance to full rank only
where it lies outside the full-rank seed baseline's range (said to be a reading, not a test),
costs are the exact byte counts and the measured throughput of the results table, and the
predictor's scores describe the runs they were fitted on. With too few seeds the section says what
could not be tested; an estimate that did not converge is named with the reason it was left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rankscope.report.collect import REFERENCE_METHOD, is_control
from rankscope.report.regime import Regime, chance_of_mean
from rankscope.report.significance import BETTER_DIRECTION, NOT_SAME_BUDGET, seeds_text
from rankscope.report.significance_map import INSIDE, NOT_SEPARATED, OUTSIDE, SEPARATED
from rankscope.report.stats import ALPHA, CORRECTION, MIN_SEEDS, NOT_TESTABLE, TESTED, format_number, format_p

QUESTIONS = ("Do the methods reach the same solution as full rank?", "At what cost?",
             "Does validation perplexity predict downstream accuracy?")
PERFORMANCE = ("val_loss", "downstream_acc")
SHOWN_PER_METHOD = 3  # strongest separated metrics named per method; the map has the rest


@dataclass
class ScaleEvidence:
    """What the findings of one scale are read from. References to tables and figures are made by the
    ``refs`` callable of :func:`findings`: label -> "[[label]]" where the document has it, else ""."""

    preset: str
    cells: pd.DataFrame           # significance_map(...) of this scale
    results: pd.DataFrame         # results_table(...)[0] of this scale (numeric)
    regime: Regime


def _see(*refs: str) -> str:
    present = [r for r in refs if r]
    return f" ({', '.join(present)})" if present else ""


def _names(methods) -> str:
    return ", ".join(f"**{m}**" for m in methods)


def _d(value: float) -> str:
    return f"{value:+.0f}" if abs(value) >= 10 else f"{value:+.1f}"


def _seeds(rows: pd.DataFrame) -> str:
    return seeds_text(np.minimum(rows["n_method"], rows["n_other"]))


def same_solution(scale: ScaleEvidence, labels: dict[str, str], refs: Callable[[str], str]) -> list[str]:
    """Per metric, the methods a corrected test separates from full rank; then the methods none
    separates; then the distances to full rank read against the seed baseline."""
    cells = scale.cells
    tests = cells[(cells["kind"] == "test") & ~cells["metric"].isin(PERFORMANCE)]
    tested = tests[tests["cell"].isin([SEPARATED, NOT_SEPARATED])]
    separated = tested[tested["cell"] == SEPARATED]
    lines = [] if len(tests) else ["No metric of the solution (landscape, spectra, activations, Hessian) has values at "
                                   "this scale: run `rankscope analyze` on the study."]
    see = _see(refs(f"sigmap-{scale.preset}"))
    # Metrics in order of their strongest evidence, methods by p within a metric.
    order = separated.groupby("metric")["p_adjusted"].min().sort_values().index
    for metric in order:
        rows = separated[separated["metric"] == metric].sort_values("p_adjusted")
        for direction, group in rows.groupby(rows["difference"] > 0, sort=False):
            entries = ", ".join(f"{r.method} (d = {_d(r.d)}, p = {format_p(r.p_adjusted)})" for r in group.itertuples())
            lines.append(f"**{labels.get(metric, metric)}** {'higher' if direction else 'lower'} than full rank: "
                         f"{entries}; {_seeds(group)}{see}.")
    quiet = [m for m in tested["method"].unique() if m not in set(separated["method"])]
    if quiet:
        rows = tested[tested["method"].isin(quiet)]
        lines.append(f"{_names(quiet)}: no tested metric separates {'it' if len(quiet) == 1 else 'them'} from full rank "
                     f"at {_seeds(rows)} — not shown to differ, which is not the same as shown equal.")
    untestable = [m for m in tests["method"].unique() if m not in set(tested["method"])]
    if untestable:
        lines.append(f"{_names(untestable)}: {NOT_TESTABLE} against full rank (fewer than {MIN_SEEDS} seeds with a "
                     "value in a group): the differences in the tables may be seed noise.")
    if len(separated):
        lines.append(f"Separated: adj. p < {ALPHA:g} after {CORRECTION}'s correction over every test of the report; d: "
                     "difference of means over the pooled seed std (a small seed spread makes it large).")
    return lines + _distance_lines(scale, labels, refs)


def _distance_lines(scale: ScaleEvidence, labels: dict[str, str], refs: Callable[[str], str]) -> list[str]:
    distances = scale.cells[scale.cells["kind"] == "distance"]
    if distances.empty:
        return []
    if (distances["cell"] == "baseline missing").all():
        return ["Distances to full rank (CKA, cosine, relative L2, IMBH) have no yardstick: "
                f"{distances['reason'].iloc[0]}."]
    outside = distances[distances["cell"] == OUTSIDE]
    see = _see(refs(f"distance-{scale.preset}"))
    lines = []
    for (metric, reading), group in outside.groupby(["metric", "reason"], sort=False):
        side = "farther from" if reading.startswith("farther") else "closer to"
        entries = ", ".join(f"{r.method} (d = {_d(r.d)})" for r in group.itertuples())
        lines.append(f"**{labels.get(metric, metric)}**: {side} full rank than two full-rank seeds are to each other: "
                     f"{entries}{see}.")
    if lines:
        lines.append("Distances: the mean of a method's comparisons with the other seeds' full-rank runs, outside the "
                     "range of the full-rank seed pairs — a reading against the seed baseline, not a test.")
    within = [m for m in distances["method"].unique() if m not in set(outside["method"])
              and (distances[distances["method"] == m]["cell"] == INSIDE).any()]
    if within:
        lines.append(f"{_names(within)}: within the seed range on every distance to full rank — as close to it as "
                     "another full-rank seed.")
    return lines


def _performance_line(scale: ScaleEvidence, metric: str, labels: dict[str, str], refs: Callable[[str], str]) -> list[str]:
    cells = scale.cells[(scale.cells["kind"] == "test") & (scale.cells["metric"] == metric)]
    if cells.empty:
        return []
    label = labels.get(metric, metric)
    lines = []
    separated = cells[cells["cell"] == SEPARATED]
    for row in separated.itertuples():
        direction = "higher" if row.difference > 0 else "lower"
        amount = (f"Δ {format_number(row.difference, 3)}, d = {_d(row.d)}, adj. p = {format_p(row.p_adjusted)}, "
                  f"{row.n_method} vs {row.n_other} seeds")
        if scale.regime.same_budget(scale.preset, row.method):
            verdict = "better" if direction == BETTER_DIRECTION[metric] else "worse"
            lines.append(f"**{row.method}**: {verdict} than full rank on {label} ({amount}; lrs tuned on the same "
                         f"budget){_see(refs(f'results-{scale.preset}'))}.")
        else:
            caveat = f" — {NOT_SAME_BUDGET}" if direction == BETTER_DIRECTION[metric] else ""
            lines.append(f"**{row.method}**: {direction} {label} than full rank ({amount}){caveat}.")
    tested = cells[cells["cell"] == NOT_SEPARATED]
    if len(tested):
        seeds = seeds_text(np.minimum(tested["n_method"], tested["n_other"]))
        lines.append(f"{label}: {_names(tested['method'])} not distinguishable from full rank at {seeds}.")
    untested = cells[~cells["cell"].isin([SEPARATED, NOT_SEPARATED])]
    if len(untested):
        lines.append(f"{label}: not tested for {_names(untested['method'])} ({', '.join(sorted(set(untested['cell'])))}"
                     f"; a test needs ≥ {MIN_SEEDS} seeds with a value in each group).")
    return lines


def _ratio_text(results: pd.DataFrame, column: str) -> tuple[str, float, float] | None:
    full = results[results["method"] == REFERENCE_METHOD]
    others = results[(results["method"] != REFERENCE_METHOD) & ~results["control"].astype(bool)]
    if full.empty or others.empty or not float(full[column].iloc[0]) > 0:
        return None
    ratios = (others[column].astype(float) / float(full[column].iloc[0])).round(2)
    if not np.isfinite(ratios).any():
        return None
    text = ", ".join(f"{m} {r:.2f}×" for m, r in sorted(zip(others["method"], ratios), key=lambda x: x[1]))
    return text, float(ratios.min()), float(ratios.max())


def cost(scale: ScaleEvidence, labels: dict[str, str], refs: Callable[[str], str]) -> list[str]:
    lines = _performance_line(scale, "val_loss", labels, refs)
    see = _see(refs(f"results-{scale.preset}"))
    state = _ratio_text(scale.results, "optimizer_state_bytes")
    if state:
        lines.append(f"Optimizer state relative to full rank (exact byte counts{see}): {state[0]}.")
    memory = _ratio_text(scale.results, "estimated_memory_bytes")
    if memory:
        lines.append(f"Weights + optimizer state relative to full rank: {memory[1]:.2f}× to {memory[2]:.2f}×.")
    speed = _ratio_text(scale.results, "tokens_per_sec_mean")
    if speed:
        lines.append(f"Training throughput relative to full rank (tokens/s on the machine that trained, mean over seeds; "
                     f"not tested): {speed[1]:.2f}× to {speed[2]:.2f}×.")
    return lines


def prediction(scale: ScaleEvidence, labels: dict[str, str], refs: Callable[[str], str]) -> list[str]:
    lines = []
    results = scale.results[~scale.results["control"].astype(bool)]
    accuracy = results["downstream_acc_mean"].astype(float)
    chance = chance_of_mean(scale.regime)
    if np.isfinite(accuracy).any():
        text = (f"Mean downstream accuracy {100 * accuracy.min():.1f}–{100 * accuracy.max():.1f} % over the methods"
                f"{_see(refs(f'results-{scale.preset}'))}")
        if np.isfinite(chance):
            # The highest mean, unnamed: naming it would be a ranking the tests did not make.
            text += (f", against a chance level of {100 * chance:.1f} %: the highest method mean is "
                     f"{100 * (accuracy.max() - chance):+.1f} points above chance")
        lines.append(text + ".")
    lines += _performance_line(scale, "downstream_acc", labels, refs)
    return lines


def predictor_lines(predictor: pd.DataFrame | None, refs: Callable[[str], str]) -> list[str]:
    """What the predictor's scores say, study-wide (it is fitted on every scale's runs together)."""
    if predictor is None or predictor.empty:
        return ["No predictor of downstream accuracy was fitted (it needs runs with downstream evaluations)."]
    rows = {str(r.feature_set): r for r in predictor.itertuples(index=False)}
    parts = []
    for name, words in (("val_loss", "val loss alone"), ("geometry", "the geometry features"),
                        ("val_loss+geometry", "both")):
        row = rows.get(name)
        if row is None:
            continue
        scores = [f"in-sample R² = {format_number(row.r2_in_sample, 2)}"]
        if np.isfinite(getattr(row, "lomo_pearson", np.nan)):
            scores.append(f"leave-one-method-out r = {format_number(row.lomo_pearson, 2)}")
        parts.append(f"{words}: {', '.join(scores)}")
    if not parts:
        return []
    n_rows = int(max(r.n_rows for r in rows.values()))
    return [f"Fitting downstream accuracy across {n_rows} runs{_see(refs('predictor'))}: " + "; ".join(parts) +
            ". These scores describe these runs: no test of predictive power was made."]


def evidence_line(comparison: pd.DataFrame, exclusions: pd.DataFrame, labels: dict[str, str],
                  refs: Callable[[str], str]) -> list[str]:
    """How sure: the test family, and what was left out."""
    tested = comparison[comparison["status"] == TESTED]
    lines = []
    if tested.empty:
        lines.append(f"**No test was computed**: every group has fewer than {MIN_SEEDS} seeds with a value, so no "
                     "difference is a finding; run more seeds.")
    else:
        lines.append(f"How sure: {len(tested)} two-sided Welch tests over seeds in one {CORRECTION}-corrected family "
                     f"(the chance of any false difference in the report ≤ {ALPHA:g}); "
                     f"{int(tested['separated'].astype(bool).sum())} separated{_see(refs('tests'))}. d is the "
                     "difference over the pooled seed std. Not separated means not shown to differ at these seeds.")
    methods_only = exclusions[~exclusions["method"].astype(str).map(is_control)] if len(exclusions) else exclusions
    # One line per (metric, reason): the reader needs the reason once, with every method it hit.
    for (metric, reason), group in methods_only.groupby(["metric", "reason"], sort=False):
        who = ", ".join(f"{m} ({n} run{'s' if n != 1 else ''})" for m, n in zip(group["method"], group["runs"]))
        lines.append(f"Left out of the tests and findings: {labels.get(metric, metric)} of {who} — {reason}.")
    return lines


def in_short(scale: ScaleEvidence, labels: dict[str, str], refs: Callable[[str], str]) -> list[str]:
    """The three answers in one line each: counts over the same cells the detailed statements use."""
    cells = scale.cells
    tests = cells[cells["kind"] == "test"]
    methods = list(dict.fromkeys(cells["method"]))
    if not methods:
        return []
    tested = tests[tests["cell"].isin([SEPARATED, NOT_SEPARATED])]
    if tested.empty:
        return [f"{len(methods)} method{'s' if len(methods) != 1 else ''} against full rank: {NOT_TESTABLE} here (fewer than {MIN_SEEDS} seeds with a "
                "value per group) — no difference is a finding."]
    geometry = tested[~tested["metric"].isin(PERFORMANCE)]
    separated = geometry[geometry["cell"] == SEPARATED]
    lines = []
    if len(geometry):
        text = (f"Same solution: {separated['method'].nunique()} of {geometry['method'].nunique()} methods differ from "
                "full rank on at least one tested metric of the solution")
        if len(separated):
            common = separated.groupby("metric")["method"].nunique().sort_values(ascending=False)
            text += f" (most often {labels.get(common.index[0], common.index[0])}: {int(common.iloc[0])} methods)"
        outside = cells[(cells["kind"] == "distance") & (cells["cell"] == OUTSIDE)]
        farther = outside[outside["reason"].astype(str).str.startswith("farther")]["method"].nunique()
        if (cells["kind"] == "distance").any():
            text += (f"; {farther} {'lies' if farther == 1 else 'lie'} farther from full rank than two full-rank seeds "
                     "on at least one distance")
        lines.append(text + _see(refs(f"sigmap-{scale.preset}")) + ".")
    for metric, question in (("val_loss", "Cost in loss"), ("downstream_acc", "Downstream")):
        rows = tested[tested["metric"] == metric]
        if len(rows):
            moved = rows[rows["cell"] == SEPARATED]
            text = (f"{question}: {len(moved)} of {len(rows)} methods separated from full rank on "
                    f"{labels.get(metric, metric)} at {_seeds(rows)}")
            if metric == "val_loss":
                state = _ratio_text(scale.results, "optimizer_state_bytes")
                if state:
                    text += f"; optimizer state {state[1]:.2f}× to {state[2]:.2f}× full rank's"
            lines.append(text + ".")
    return lines


def findings(scales: list[ScaleEvidence], comparison: pd.DataFrame, predictor: pd.DataFrame | None,
             exclusions: pd.DataFrame, labels: dict[str, str], refs: Callable[[str], str]) -> list[tuple[str, list[str]]]:
    """(question, statements) for the report's findings section."""
    several = len(scales) > 1

    def per_scale(builder) -> list[str]:
        out = []
        for scale in scales:
            out += [f"*{scale.preset}*: {line}" if several else line for line in builder(scale, labels, refs)]
        return out

    answers = [per_scale(same_solution), per_scale(cost), per_scale(prediction) + predictor_lines(predictor, refs)]
    sections = [("In short", per_scale(in_short))] if any(len(s.cells) for s in scales) else []
    sections += [(question, lines or ["Nothing to state: no method other than full rank has results."])
                 for question, lines in zip(QUESTIONS, answers)]
    sections.append(("How sure", evidence_line(comparison, exclusions, labels, refs)))
    return sections


__all__ = ["QUESTIONS", "ScaleEvidence", "findings"]
