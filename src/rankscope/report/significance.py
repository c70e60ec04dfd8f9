"""What the report may say about differences between methods: the sentences and the table of its
comparison section, and its ranking of methods. The numbers come from
:func:`rankscope.report.stats.compare_methods` (one Holm-adjusted family); whether a difference in
loss or accuracy may be called "better" comes from the learning-rate provenance of
:mod:`rankscope.report.regime`.

The rules:
- a difference is stated only where its Holm-adjusted p < 0.05; otherwise the pair is "not
  distinguishable at N seeds"; below 3 seeds a group is "not testable" and no test is computed;
- "better" / "worse" than full rank only when the method and full rank had their learning rates
  tuned on the same budget; otherwise the difference is stated as higher / lower, with the line
  "full rank not tuned on the same budget: differences are not evidence that a method beats full
  rank";
- methods are put in an order only for the pairs a test separates;
- controls (`frozen`: only embeddings, head and norms train) are reference rows: never tested,
  compared or ranked; what they say about the regime is :mod:`rankscope.report.informativeness`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rankscope.report.collect import REFERENCE_METHOD, Study, finite, is_control
from rankscope.report.regime import Regime
from rankscope.report.stats import (
    ALPHA,
    CORRECTION,
    MIN_SEEDS,
    NO_SPREAD,
    NO_VALUES,
    NOT_TESTABLE,
    TESTED,
    compare_methods,
    format_number,
    format_p,
)

# Metrics where one direction is better (the rest are geometry: only higher or lower).
BETTER_DIRECTION: dict[str, str] = {"val_loss": "lower", "val_ppl": "lower", "downstream_acc": "higher"}
RANKING_METRICS: tuple[str, ...] = ("val_loss", "downstream_acc")
NOT_SAME_BUDGET = "full rank not tuned on the same budget: differences are not evidence that a method beats full rank"


def study_comparison(study: Study, labels: dict[str, str], features: pd.DataFrame | None = None) -> pd.DataFrame:
    """The report's comparison family (:func:`compare_methods`) for a loaded study: every run-level
    metric of the report's tables (the keys of `labels`), over the runs that finished training (a
    run with a summary.json counts even if a later stage failed; the results table's rule)."""
    from rankscope.report.baseline import FINAL_MEASURES
    from rankscope.report.run_features import run_features

    features = run_features(study) if features is None else features
    # val ppl is exp(val loss) run by run: testing both would ask one question twice. Distances to
    # full rank are read against the seed baseline instead: full rank's distance to itself is no
    # sample to test against.
    metrics = [m for m in labels if m in features.columns and m != "val_ppl" and m not in FINAL_MEASURES]
    # A control is a yardstick for the regime, not a contender: a test against it would spend the
    # family's error budget on a question nobody asks, and rank it among the methods.
    methods_only = features[finite(features["val_loss"]) & ~features["method"].astype(str).map(is_control)]
    return compare_methods(methods_only, metrics, RANKING_METRICS)


def without_controls(comparison: pd.DataFrame) -> pd.DataFrame:
    """The comparison rows between two methods (a table built without `study_comparison` may hold
    rows with a control, which nothing here may word or rank)."""
    if comparison.empty:
        return comparison
    involved = comparison["method"].astype(str).map(is_control) | comparison["other"].astype(str).map(is_control)
    return comparison[~involved]


def seeds_text(counts) -> str:
    """'3 seeds' when every group has 3, '3–5 seeds' otherwise."""
    counts = sorted({int(c) for c in counts})
    if not counts:
        return "0 seeds"
    return f"{counts[0]} seed{'s' if counts[0] != 1 else ''}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]} seeds"


def _label(metric: str, labels: dict[str, str]) -> str:
    return labels.get(metric, metric)


def _difference_phrase(row, labels: dict[str, str], same_budget: bool) -> tuple[str, bool]:
    """The words for one separated comparison with full rank, and whether it favours the method on
    a performance metric without same-budget tuning (which then needs the caveat)."""
    higher = row.difference > 0
    direction = "higher" if higher else "lower"
    amount = f"by {format_number(abs(row.difference))}, {CORRECTION}-adjusted p = {format_p(row.p_adjusted)}"
    label = _label(row.metric, labels)
    better = BETTER_DIRECTION.get(row.metric)
    if better is not None and same_budget:
        verdict = "better" if direction == better else "worse"
        return f"{verdict} than full rank on {label} ({direction}, {amount}; lrs tuned on the same budget)", False
    return f"{direction} {label} than full rank ({amount})", better is not None and direction == better


def family_statement(comparison: pd.DataFrame) -> str:
    """One line on the test, the correction and the family it was applied to."""
    tested = comparison[comparison["status"] == TESTED]
    untestable = comparison[comparison["status"] == NOT_TESTABLE]
    if tested.empty:
        return (f"No test was computed: every comparison of this report has a group with fewer than {MIN_SEEDS} seeds "
                f"({NOT_TESTABLE}) or without values, so no difference between methods is stated. The differences in "
                "the tables may be seed noise.")
    text = (f"Every comparison of this report is a two-sided Welch t-test of the difference of means over seeds; all "
            f"{len(tested)} tests of the report (every scale; each method vs full rank on every metric, and every pair "
            f"of methods on {' and '.join(RANKING_METRICS).replace('_', ' ')}) form one family, adjusted with {CORRECTION}'s "
            f"method, which keeps the chance of any false difference in the report at ≤ {ALPHA:g} under any dependence "
            f"between the tests. A difference is stated only where the adjusted p < {ALPHA:g}; "
            f"{int(tested['separated'].astype(bool).sum())} of {len(tested)} are.")
    if len(untestable):
        text += (f" {len(untestable)} comparisons are {NOT_TESTABLE}: a group has fewer than {MIN_SEEDS} seeds, "
                 "so no test was computed.")
    return text + " Not separated means not shown to differ at this number of seeds, not equal."


def tuning_statement(regime: Regime, preset: str) -> str:
    """Whether 'better than full rank' may be said at this scale, and why."""
    others = [m for m in regime.methods(preset) if m != REFERENCE_METHOD and not is_control(m)]
    if not others or not regime.lr_choices(preset, REFERENCE_METHOD):
        return "No pair of full rank and another method trained at this scale: nothing is worded as better or worse."
    untuned = [m for m in others if not regime.same_budget(preset, m)]
    if not untuned:
        budget = regime.lr_choices(preset, REFERENCE_METHOD)[0].budget
        return f"Full rank and every method had their lr tuned on the same budget ({budget}): differences in loss and accuracy are worded as better / worse."
    full = regime.lr_choices(preset, REFERENCE_METHOD)
    full_text = ", ".join(sorted({f"lr {c.lr:g} ({c.source}{', ' + c.budget if c.budget else ''})" for c in full})) or "no run"
    return (f"**{NOT_SAME_BUDGET}** (full rank: {full_text}; not tuned on the same budget as full rank: "
            f"{', '.join(untuned)}). Differences are stated as higher / lower, never as better.")


def comparison_words(comparison: pd.DataFrame, preset: str, regime: Regime, labels: dict[str, str]) -> list[str]:
    """One sentence per method: how it compares with full rank at this scale."""
    comparison = without_controls(comparison)
    rows = comparison[(comparison["preset"].astype(str) == str(preset)) & (comparison["kind"] == "reference")]
    if rows.empty:
        return ["No method other than full rank has results at this scale: nothing to compare."]
    if (rows["n_other"] == 0).all():
        return [f"No finished full-rank ({REFERENCE_METHOD}) run at this scale, so no method is compared with it."]
    sentences = []
    for method, group in rows.groupby("method", sort=True):
        same_budget = regime.same_budget(preset, str(method))
        n_method, n_full = int(group["n_method"].max()), int(group["n_other"].max())
        head = f"**{method}** vs {REFERENCE_METHOD} ({n_method} / {n_full} seeds)"
        status = group["status"]
        if (status == NOT_TESTABLE).sum() and not (status == TESTED).any() and not (status == NO_SPREAD).any():
            sentences.append(f"{head}: {NOT_TESTABLE} — a test needs ≥ {MIN_SEEDS} seeds in each group; "
                             "the differences in the tables may be seed noise.")
            continue
        parts, needs_caveat = [], False
        for row in group[(status == TESTED) & group["separated"].astype(bool)].itertuples():
            phrase, caveat = _difference_phrase(row, labels, same_budget)
            parts.append(phrase)
            needs_caveat |= caveat
        within = group[(status == TESTED) & ~group["separated"].astype(bool)]
        if len(within):
            seeds = seeds_text(np.minimum(within["n_method"], within["n_other"]))
            parts.append(f"not distinguishable at {seeds} on " + ", ".join(_label(m, labels) for m in within["metric"]))
        for state, words in ((NOT_TESTABLE, f"{NOT_TESTABLE} (fewer than {MIN_SEEDS} seeds with a value) on "),
                             (NO_SPREAD, "no seed-to-seed spread in either group, so no t-test, on ")):
            chosen = group[status == state]
            if len(chosen):
                parts.append(words + ", ".join(_label(m, labels) for m in chosen["metric"]))
        missing = group[status == NO_VALUES]
        if len(missing):
            parts.append("no values (not applicable or not computed) on " + ", ".join(_label(m, labels) for m in missing["metric"]))
        sentence = f"{head}: " + "; ".join(parts) + "."
        if needs_caveat:
            sentence += f" ({NOT_SAME_BUDGET}.)"
        sentences.append(sentence)
    return sentences


def ranking_words(comparison: pd.DataFrame, preset: str, regime: Regime, labels: dict[str, str]) -> list[str]:
    """Per ranking metric: the pairs of methods a corrected test separates, and nothing else."""
    comparison = without_controls(comparison)
    in_preset = comparison[comparison["preset"].astype(str) == str(preset)]
    methods = sorted(set(in_preset["method"]) | set(in_preset["other"]))
    all_tuned = all(regime.same_budget(preset, m) for m in methods if m != REFERENCE_METHOD)
    lines = []
    for metric in RANKING_METRICS:
        rows = in_preset[in_preset["metric"] == metric]
        if rows.empty:
            continue
        label = _label(metric, labels)
        tested = rows[rows["status"] == TESTED]
        if tested.empty:
            lines.append(f"{label}: {NOT_TESTABLE} — fewer than {MIN_SEEDS} seeds per method, so no order is given.")
            continue
        seeds = seeds_text(np.minimum(tested["n_method"], tested["n_other"]))
        separated = tested[tested["separated"].astype(bool)].sort_values("p_adjusted")
        if separated.empty:
            lines.append(f"{label}: no two methods are separated — not distinguishable at {seeds} "
                         f"({CORRECTION}-adjusted p ≥ {ALPHA:g} for all {len(tested)} tested pairs); "
                         "the tables list methods alphabetically, not in rank order.")
            continue
        pairs, caveat = [], False
        for row in separated.itertuples():
            low, high = (row.method, row.other) if row.mean_method < row.mean_other else (row.other, row.method)
            pairs.append(f"{low} < {high} (adjusted p = {format_p(row.p_adjusted)})")
            if REFERENCE_METHOD in (low, high):
                method = high if low == REFERENCE_METHOD else low
                favours_method = (method == low) == (BETTER_DIRECTION.get(metric) == "lower")
                caveat |= favours_method and not regime.same_budget(preset, method)
        line = (f"{label}: separated pairs ({CORRECTION}-adjusted p < {ALPHA:g}): " + "; ".join(pairs) +
                f". Every other pair: not distinguishable at {seeds}.")
        if (rows["status"] == NOT_TESTABLE).any():
            line += f" Pairs with a method of fewer than {MIN_SEEDS} seeds: {NOT_TESTABLE}."
        if not all_tuned:
            line += " The lrs were not all tuned on the same budget, so this orders these runs, not the methods."
        if caveat:
            line += f" And: {NOT_SAME_BUDGET}."
        lines.append(line)
    return lines


def _verdict(row) -> str:
    if row.status == TESTED:
        return "separated" if row.separated else f"not distinguishable at {seeds_text([min(row.n_method, row.n_other)])}"
    return {NOT_TESTABLE: f"{NOT_TESTABLE} (< {MIN_SEEDS} seeds)", NO_SPREAD: "no spread: no t-test",
            NO_VALUES: "no values (not applicable or not computed)"}[row.status]


def comparison_display(comparison: pd.DataFrame, preset: str, labels: dict[str, str]) -> pd.DataFrame:
    """The vs-full-rank rows of one scale as the report shows them; empty when none was tested
    (a table of "not testable" rows would only repeat the results tables' differences)."""
    comparison = without_controls(comparison)
    rows = comparison[(comparison["preset"].astype(str) == str(preset)) & (comparison["kind"] == "reference")]
    if not (rows["status"] == TESTED).any():
        rows = rows.iloc[:0]
    return pd.DataFrame({
        "metric": [_label(m, labels) for m in rows["metric"]],
        "method": rows["method"].to_numpy(),
        "seeds (method / full)": [f"{a} / {b}" for a, b in zip(rows["n_method"], rows["n_other"])],
        "difference to full": rows["difference"].to_numpy(),
        "Welch p": [format_p(p) for p in rows["p_value"]],
        f"{CORRECTION}-adjusted p": [format_p(p) for p in rows["p_adjusted"]],
        "verdict": [_verdict(row) for row in rows.itertuples()],
    })


__all__ = ["BETTER_DIRECTION", "NOT_SAME_BUDGET", "RANKING_METRICS", "comparison_display", "comparison_words",
           "family_statement", "ranking_words", "seeds_text", "study_comparison", "tuning_statement",
           "without_controls"]
