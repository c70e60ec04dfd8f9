"""Run-level numbers for the report's tables: one row per run with the final-checkpoint features
of :mod:`rankscope.analysis.features` (the predictor's, under the same names) at the run's last
analysed checkpoint, and `not_applicable` ("feature: reason; ...") where a feature does not apply.

The full-rank row's IMBH to full-rank is the barrier to the full-rank runs of the other seeds:
the seed-to-seed baseline the other methods are read against.
"""

from __future__ import annotations

import pandas as pd

from rankscope.analysis.features import final_features
from rankscope.report.collect import Study


def run_features(study: Study) -> pd.DataFrame:
    base = study.runs[["run", "method", "preset", "seed", "status", "val_loss", "val_ppl", "downstream_acc"]].copy()
    by_run = {family: dict(tuple(table.groupby("run"))) for family, table in study.tables.items() if "run" in table.columns}
    rows = []
    for run, method in zip(base["run"], base["method"]):
        tables = {family: runs.get(run) for family, runs in by_run.items()}
        rows.append(final_features(tables, str(run), str(method), step=None, reference_imbh="seeds"))
    return pd.concat([base.reset_index(drop=True), pd.DataFrame(rows)], axis=1)


__all__ = ["run_features"]
