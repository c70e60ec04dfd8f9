"""Seed statistics and the tests behind every comparison the report makes.

The comparisons (one row each in tables/significance.csv), per scale:

- every method ≠ full rank against full rank on every run-level metric (the methods × metrics
  family), and
- every pair of methods on the ranking metrics (val loss, downstream accuracy), so that methods
  are put in an order only where a test separates them.

Each comparison is the difference of the means over seeds, Welch's t-test (two-sided, unequal
variances, `scipy.stats.ttest_ind(equal_var=False)`) and its 95% CI of the difference (per
comparison, not adjusted). All p-values of the report form **one family** and are adjusted with
**Holm's step-down method** (Holm 1979); a comparison is "separated" when its adjusted p < 0.05.

Why Holm rather than Benjamini–Hochberg: the report states its findings one sentence at a time
("GaLore's val loss differs from full rank's"), so each such sentence should be trustworthy on its
own: Holm bounds the chance of *any* false claim in the report by 5% (family-wise error), BH only
the expected share of false claims among those made. And the tests are strongly dependent (every
metric is measured on the same runs, every comparison with full rank shares the full-rank group):
Holm is valid under any dependence, BH's guarantee needs positive regression dependence, which
two-sided tests of correlated metrics do not ensure.

Below `MIN_SEEDS` finite values in either group no test is computed and the row says "not
testable": with two values per group the t statistic rests on a variance estimated from one degree
of freedom per group. A group without any seed-to-seed spread on both sides ("no spread", e.g. a
value fixed by the architecture) is not a t-test either. Rows without a test are not members of
the family: they neither use up nor receive any of its error budget.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

MIN_SEEDS = 3
ALPHA = 0.05
CORRECTION = "Holm"
NOT_TESTABLE = "not testable"

TESTED, NO_SPREAD, NO_VALUES = "tested", "no spread", "no values"
COLUMNS = ["preset", "metric", "kind", "method", "other", "n_method", "n_other", "mean_method", "mean_other",
           "difference", "ci_low", "ci_high", "t_statistic", "p_value", "p_adjusted", "separated", "status"]


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1, n) of the finite values; std is NaN below 2 values."""
    finite = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan, 0
    std = float(np.std(finite, ddof=1)) if finite.size >= 2 else math.nan
    return float(np.mean(finite)), std, int(finite.size)


def format_number(value: float, digits: int = 4) -> str:
    """Significant-digit formatting that stays readable from 1e-6 to 1e9."""
    if value is None or not np.isfinite(value):
        return "–"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e5 or magnitude < 1e-3:
        return f"{value:.{max(digits - 1, 1)}e}"
    decimals = max(digits - 1 - int(math.floor(math.log10(magnitude))), 0)
    return f"{value:.{decimals}f}"


def format_mean_std(mean: float, std: float, n: int, digits: int = 4) -> str:
    if n == 0:
        return "–"
    if n == 1:
        return f"{format_number(mean, digits)} (1 seed)"
    return f"{format_number(mean, digits)} ± {format_number(std, 2)}"


def format_p(value: float) -> str:
    """A p-value as the report prints it: two significant digits."""
    return format_number(value, 2)


def welch_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(t, two-sided p, CI low, CI high) of Welch's t-test of mean(a) − mean(b); NaN when
    undefined (fewer than 2 values in a group, or no spread in either group: scipy would return
    an infinite t and p = 0 there, which is not a test)."""
    from scipy import stats

    a = np.asarray(a, float)
    b = np.asarray(b, float)
    if a.size < 2 or b.size < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return math.nan, math.nan, math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # near-constant groups: scipy warns about precision
        result = stats.ttest_ind(a, b, equal_var=False)
        interval = result.confidence_interval(confidence)
    return float(result.statistic), float(result.pvalue), float(interval.low), float(interval.high)


def holm_adjust(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input order; NaN entries are not tests and stay
    NaN (the family size m counts the finite ones).

    With the m finite p-values sorted, p_(1) ≤ … ≤ p_(m): adjusted p_(i) = max over j ≤ i of
    min(1, (m − j + 1) · p_(j)). Rejecting where adjusted p < α is Holm's procedure at level α.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, math.nan)
    tested = np.flatnonzero(np.isfinite(p))
    m = tested.size
    if m == 0:
        return adjusted
    order = tested[np.argsort(p[tested], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def _finite_values(frame: pd.DataFrame, metric: str) -> np.ndarray:
    return pd.to_numeric(frame[metric], errors="coerce").dropna().to_numpy(dtype=float)


def _compare(preset, metric: str, kind: str, method: str, other: str, own: np.ndarray, theirs: np.ndarray) -> dict:
    row = {"preset": preset, "metric": metric, "kind": kind, "method": method, "other": other,
           "n_method": int(own.size), "n_other": int(theirs.size),
           "mean_method": float(own.mean()) if own.size else math.nan,
           "mean_other": float(theirs.mean()) if theirs.size else math.nan,
           "ci_low": math.nan, "ci_high": math.nan, "t_statistic": math.nan, "p_value": math.nan}
    row["difference"] = row["mean_method"] - row["mean_other"]
    if own.size == 0 or theirs.size == 0:
        # Not a seed problem: one side has no value at all (not applicable, or not computed).
        row["status"] = NO_VALUES
    elif own.size < MIN_SEEDS or theirs.size < MIN_SEEDS:
        row["status"] = NOT_TESTABLE
    else:
        t_statistic, p_value, ci_low, ci_high = welch_test(own, theirs)
        row.update(t_statistic=t_statistic, p_value=p_value, ci_low=ci_low, ci_high=ci_high,
                   status=TESTED if np.isfinite(p_value) else NO_SPREAD)
    return row


def compare_methods(values: pd.DataFrame, metrics: Sequence[str], ranking_metrics: Sequence[str],
                    reference: str = "full", alpha: float = ALPHA) -> pd.DataFrame:
    """The report's comparison family, Holm-adjusted as one family.

    `values` has one row per run with columns `method`, `preset` and the metric columns. Rows:
    `kind` = "reference" for every (preset, metric, method ≠ reference) against the reference;
    `kind` = "pair" for every other pair of methods on the `ranking_metrics` (the pairs with the
    reference are the "reference" rows already). `status` is tested | not testable | no spread |
    no values; `p_adjusted` and `separated` (adjusted p < alpha) are set for tested rows only.
    """
    rows = []
    for preset, group in values.groupby("preset", sort=False):
        methods = sorted(str(m) for m in group["method"].dropna().unique())
        by_method = {m: group[group["method"] == m] for m in methods}
        for metric in metrics:
            if metric not in group.columns:
                continue
            seeds = {m: _finite_values(by_method[m], metric) for m in methods}
            others = [m for m in methods if m != reference]
            pairs = [("reference", m, reference) for m in others]
            if metric in ranking_metrics:
                pairs += [("pair", a, b) for a, b in itertools.combinations(others, 2)]
            for kind, method, other in pairs:
                own, theirs = seeds[method], seeds.get(other, np.zeros(0))
                if own.size == 0 and theirs.size == 0:
                    continue  # the metric does not exist for this pair at all
                rows.append(_compare(preset, metric, kind, method, other, own, theirs))
    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c not in ("p_adjusted", "separated")])
    table["p_adjusted"] = holm_adjust(table["p_value"].to_numpy(dtype=float)) if len(table) else []
    table["separated"] = table["p_adjusted"].to_numpy(dtype=float) < alpha if len(table) else []
    return table[COLUMNS]


__all__ = ["ALPHA", "CORRECTION", "MIN_SEEDS", "NOT_TESTABLE", "NO_SPREAD", "NO_VALUES", "TESTED", "compare_methods",
           "format_mean_std", "format_number", "format_p", "holm_adjust", "mean_std", "welch_test"]
