"""Seed statistics: mean ± std over seeds, and whether a method's difference to full-rank
exceeds seed-to-seed variation.

For each (scale, metric, method ≠ full) the comparison uses the per-seed values of the method
and of the full-rank runs at the same scale:

- **difference** = mean(method) − mean(full);
- **Welch's t-test** (unequal variances, `scipy.stats.ttest_ind(equal_var=False)`), two-sided;
- **bootstrap CI** of the difference: each group's seeds resampled with replacement on their
  own (`n_boot` times, seeded, so the report is reproducible), percentile interval.

Both need at least 2 seeds in each group; below that the row carries the statement
"needs ≥ 2 seeds per method" instead of numbers. With 2–3 seeds a test has little power: a
"within seed variation" verdict means "not shown to differ", not "equal".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

MIN_SEEDS = 2
ALPHA = 0.05
NEEDS_SEEDS = "needs ≥ 2 seeds per method"


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


def welch_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(t, two-sided p) of Welch's t-test of mean(a) vs mean(b); NaN when undefined (both groups
    without spread)."""
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero variance: scipy warns and returns NaN
        result = stats.ttest_ind(np.asarray(a, float), np.asarray(b, float), equal_var=False)
    return float(result.statistic), float(result.pvalue)


def bootstrap_difference_ci(a: Sequence[float], b: Sequence[float], n_boot: int = 10_000,
                            confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a) − mean(b), each group resampled on its own."""
    rng = np.random.default_rng(seed)
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    means_a = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(axis=1)
    means_b = b[rng.integers(0, b.size, size=(n_boot, b.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means_a - means_b, [tail, 1.0 - tail])
    return float(low), float(high)


def _verdict(p_value: float, ci_low: float, ci_high: float) -> str:
    test_says = np.isfinite(p_value) and p_value < ALPHA
    ci_says = ci_low > 0 or ci_high < 0
    if not np.isfinite(p_value):
        return ("exceeds seed variation (no seed spread; CI excludes 0)" if ci_says
                else "undefined: no seed-to-seed spread in either group")
    if test_says and ci_says:
        return "exceeds seed variation"
    if test_says or ci_says:
        return "borderline (" + ("Welch p < 0.05" if test_says else "CI excludes 0") + " only)"
    return "within seed variation"


def compare_to_reference(values: pd.DataFrame, metrics: Sequence[str], reference: str = "full",
                         n_boot: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Per (preset, metric, method ≠ reference): difference to the reference method and its tests.

    `values` has one row per run with columns `method`, `preset` and the metric columns.
    A row whose method or reference has fewer than 2 finite seeds gets `statement` =
    "needs ≥ 2 seeds per method (...)" and NaN numbers.
    """
    rows = []
    for preset, group in values.groupby("preset", sort=False):
        reference_rows = group[group["method"] == reference]
        for metric in metrics:
            if metric not in group.columns:
                continue
            ref_values = pd.to_numeric(reference_rows[metric], errors="coerce").dropna().to_numpy()
            for method, method_rows in group[group["method"] != reference].groupby("method", sort=True):
                own = pd.to_numeric(method_rows[metric], errors="coerce").dropna().to_numpy()
                if own.size == 0 and ref_values.size == 0:
                    continue  # the metric does not exist for this pair at all
                row = {"preset": preset, "metric": metric, "method": method, "reference": reference,
                       "n_method": int(own.size), "n_reference": int(ref_values.size),
                       "mean_method": float(own.mean()) if own.size else math.nan,
                       "mean_reference": float(ref_values.mean()) if ref_values.size else math.nan}
                row["difference"] = row["mean_method"] - row["mean_reference"]
                if own.size == 0 or ref_values.size == 0:
                    # Not a seed problem: the metric has no value for one side (not applicable,
                    # e.g. IMBH of a method without a dense form, or not computed).
                    missing = method if own.size == 0 else reference
                    row.update(t_statistic=math.nan, p_value=math.nan, ci_low=math.nan, ci_high=math.nan,
                               verdict="no values", statement=f"no values for {missing} (not applicable or not computed)")
                elif own.size < MIN_SEEDS or ref_values.size < MIN_SEEDS:
                    row.update(t_statistic=math.nan, p_value=math.nan, ci_low=math.nan, ci_high=math.nan,
                               verdict="cannot be assessed",
                               statement=f"{NEEDS_SEEDS} ({reference}: {ref_values.size}, {method}: {own.size})")
                else:
                    t_statistic, p_value = welch_test(own, ref_values)
                    ci_low, ci_high = bootstrap_difference_ci(own, ref_values, n_boot=n_boot, seed=seed)
                    verdict = _verdict(p_value, ci_low, ci_high)
                    row.update(t_statistic=t_statistic, p_value=p_value, ci_low=ci_low, ci_high=ci_high,
                               verdict=verdict,
                               statement=(f"{verdict}: difference {format_number(row['difference'])}, "
                                          f"95% bootstrap CI [{format_number(ci_low)}, {format_number(ci_high)}], "
                                          f"Welch p = {format_number(p_value, 2)}"))
                rows.append(row)
    columns = ["preset", "metric", "method", "reference", "n_method", "n_reference", "mean_method",
               "mean_reference", "difference", "ci_low", "ci_high", "t_statistic", "p_value", "verdict", "statement"]
    return pd.DataFrame(rows, columns=columns)


__all__ = ["ALPHA", "MIN_SEEDS", "NEEDS_SEEDS", "bootstrap_difference_ci", "compare_to_reference",
           "format_mean_std", "format_number", "mean_std", "welch_test"]
