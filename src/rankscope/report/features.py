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


__all__ = ["run_features"]
