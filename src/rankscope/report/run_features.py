"""Run-level numbers for the report's tables: one row per run with the final-checkpoint features
of :mod:`rankscope.analysis.features` (the predictor's, under the same names) at the run's last
analysed checkpoint, and `not_applicable` ("feature: reason; ...") where a feature does not apply.

The features that compare a run with full rank (CKA, cosine, relative L2, IMBH) are to the
full-rank run of the run's own seed; ``<feature>_cross_seed`` is the mean over the full-rank runs
of the other seeds. A full-rank run's own row shows, in place of the trivial comparison with
itself (CKA 1, IMBH 0), the mean over the seed-baseline pairs it belongs to
(:mod:`rankscope.report.baseline`), NaN where the scale has no baseline.
"""

from __future__ import annotations

import math

import pandas as pd

from rankscope.analysis.features import final_features
from rankscope.report.baseline import FINAL_MEASURES, SeedBaselines
from rankscope.report.collect import REFERENCE_METHOD, Study


def run_features(study: Study, baselines: SeedBaselines | None = None) -> pd.DataFrame:
    base = study.runs[["run", "method", "preset", "seed", "status", "val_loss", "val_ppl", "downstream_acc"]].copy()
    by_run = {family: dict(tuple(table.groupby("run"))) for family, table in study.tables.items() if "run" in table.columns}
    rows = []
    for run, method in zip(base["run"], base["method"]):
        tables = {family: runs.get(run) for family, runs in by_run.items()}
        rows.append(final_features(tables, str(run), str(method), step=None))
    features = pd.concat([base.reset_index(drop=True), pd.DataFrame(rows)], axis=1)
    return _with_seed_comparisons(features, baselines or SeedBaselines(study))


def _with_seed_comparisons(features: pd.DataFrame, baselines: SeedBaselines) -> pd.DataFrame:
    final = baselines.final
    features = features.copy()
    for measure in FINAL_MEASURES:
        rows = final[final["measure"] == measure]
        cross, own = [], []
        for run, method in zip(features["run"].astype(str), features["method"].astype(str)):
            if method == REFERENCE_METHOD:
                pairs = rows[(rows["method"] == REFERENCE_METHOD) & (rows["pairing"] == "cross-seed")
                             & ((rows["run"] == run) | (rows["partner"] == run))]
                value = float(pairs["value"].mean()) if len(pairs) else math.nan
                cross.append(value)
                own.append(value)
            else:
                mine = rows[(rows["run"] == run) & (rows["pairing"] == "cross-seed")]
                cross.append(float(mine["value"].mean()) if len(mine) else math.nan)
        features[f"{measure}_cross_seed"] = cross
        if measure in features.columns:
            full = features["method"].astype(str) == REFERENCE_METHOD
            features.loc[full, measure] = own
    return features


def parse_reasons(text) -> dict[str, str]:
    """``{feature: reason}`` of a "feature: reason; feature: reason" cell (not_applicable, unconverged)."""
    reasons: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in ("" if pd.isna(text) else str(text)).split(";"))):
        feature, _, reason = part.partition(": ")
        reasons.setdefault(feature, reason)
    return reasons


def converged_only(features: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The features with every estimate listed in a run's ``unconverged`` cell set to NaN (what the
    test family and the findings may use), and one row per (preset, method, metric) left out:
    runs and the first reason. A value whose estimator did not converge is shown, marked, in the
    tables; it is never tested or stated."""
    masked = features.copy()
    left_out: dict[tuple[str, str, str], dict] = {}
    if "unconverged" not in features.columns:
        return masked, pd.DataFrame(columns=["preset", "method", "metric", "runs", "reason"])
    for index, row in features.iterrows():
        for feature, reason in parse_reasons(row["unconverged"]).items():
            if feature not in masked.columns:
                continue
            masked.at[index, feature] = math.nan
            key = (str(row["preset"]), str(row["method"]), feature)
            entry = left_out.setdefault(key, {"preset": key[0], "method": key[1], "metric": feature, "runs": 0,
                                              "reason": reason})
            entry["runs"] += 1
    return masked, pd.DataFrame(list(left_out.values()), columns=["preset", "method", "metric", "runs", "reason"])


__all__ = ["converged_only", "parse_reasons", "run_features"]
