"""The predict stage: one row of features per finished run (analysis/features.py) and the fits that
predict downstream accuracy from validation loss and from the geometry. It runs in the study
driver: it only reads tables.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rankscope.study.spec import PredictorSpec
from rankscope.study.status import StudyStatus

log = logging.getLogger("rankscope.study")


def run_predict_stage(planned, runs_dir: Path, out: Path, status: StudyStatus, spec: PredictorSpec) -> None:
    from rankscope.analysis.features import predictor_table
    from rankscope.analysis.predictor import GEOMETRY_FEATURES, fit_predictors

    table = predictor_table(planned, runs_dir)
    table.to_csv(out / "predictor_features.csv", index=False)
    if table.empty:
        log.warning("predictor: no finished runs")
        return
    geometry = list(spec.features) or list(GEOMETRY_FEATURES)
    feature_sets = {"val_loss": ["val_loss"], "geometry": geometry, "val_loss+geometry": ["val_loss", *geometry]}
    result = fit_predictors(table, target="downstream_acc", feature_sets=feature_sets, alpha=spec.alpha, missing=spec.missing)
    result.to_csv(out / "predictor.csv", index=False)

