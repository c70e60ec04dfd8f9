"""Predict a run's downstream accuracy from validation loss and/or final-checkpoint geometry.

METRICS.md §5: ridge regression on standardized features (sklearn `StandardScaler` + `Ridge`),
scored three ways for each feature set:

- **in-sample R²**: fit on every run, R² of its own predictions;
- **LOSO Pearson r** (leave one scale out): for each model scale, fit on the runs of the other
  scales and predict the held-out scale; Pearson r between all held-out predictions and truth;
- **LOMO Pearson r** (leave one method out): the same with the `method` column.

A score that cannot be computed is NaN with the reason in the row's `note`, never a made-up
number: fewer than 2 scales (or methods), a constant target, constant held-out predictions.

**Missing features.** Every feature set is fit on the same runs, so their scores compare
(`missing`): ``common`` (default) drops a run that lacks any feature of any set from every set
(CoLA's IMBH is not applicable, so CoLA drops out of all three fits, the validation-loss-only
one included); ``impute`` keeps every run with a target and fills a missing feature with its
mean over the training runs of each fit (a scikit-learn `SimpleImputer` inside the pipeline, so a
held-out run never informs its own value). A feature with no value for any run cannot be fit or
imputed: its sets report that, and it does not drop runs from the others. Each row says which
rule it used and how many runs it fit.

**Several seeds.** When some (method, scale) has more than one run (column `seed`), the main
scores are computed on the seed-averaged table (one row per (method, scale): the mean of every
feature and of the target over its seeds), and each score is also computed per replicate: the
k-th replicate is the run with the k-th smallest seed of every (method, scale) that has at least
k+1 seeds (so seeds need not be the same numbers across runs). The `<score>_mean` and
`<score>_std` columns are the mean and sample standard deviation (ddof=1) of the score over the
replicates where it is defined; `n_replicates` says how many replicates were fit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

GEOMETRY_FEATURES: list[str] = [
    "es_random",
    "dv_random",
    "es_singular_top1",
    "es_singular_top5",
    "imbh_to_full",
    "effective_rank_w",
    "stable_rank_w",
    "cka_to_reference",
]

DEFAULT_FEATURE_SETS: dict[str, list[str]] = {
    "val_loss": ["val_loss"],
    "geometry": list(GEOMETRY_FEATURES),
    "val_loss+geometry": ["val_loss"] + list(GEOMETRY_FEATURES),
}

SCORES = ("r2_in_sample", "loso_pearson", "lomo_pearson")
MISSING_RULES = ("common", "impute")
_CONSTANT_TOL = 1e-12


def _ridge(alpha: float, impute: bool = False):
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps = ([SimpleImputer(strategy="mean")] if impute else []) + [StandardScaler(), Ridge(alpha=alpha)]
    return make_pipeline(*steps)


def _is_constant(values: np.ndarray) -> bool:
    return values.size == 0 or float(np.ptp(values)) <= _CONSTANT_TOL * max(1.0, float(np.max(np.abs(values))))


def _in_sample_r2(x: np.ndarray, y: np.ndarray, alpha: float, impute: bool = False) -> tuple[float, str | None]:
    if len(y) < 2:
        return math.nan, f"R² cannot be computed: needs ≥ 2 runs (have {len(y)})"
    if _is_constant(y):
        return math.nan, "R² undefined: the target is constant"
    prediction = _ridge(alpha, impute).fit(x, y).predict(x)
    residual = float(np.sum((y - prediction) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - residual / total, None


def _held_out_pearson(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, alpha: float,
                      label: str, plural: str, impute: bool = False) -> tuple[float, str | None]:
    """Pearson r between leave-one-group-out predictions and truth."""
    if groups is None:
        return math.nan, f"{label} cannot be computed: the table has no '{plural[:-1]}' column"
    distinct = pd.unique(groups)
    if len(distinct) < 2:
        return math.nan, f"{label} cannot be computed: needs ≥ 2 {plural} (have {len(distinct)})"
    prediction = np.empty_like(y, dtype=float)
    for group in distinct:
        held_out = groups == group
        prediction[held_out] = _ridge(alpha, impute).fit(x[~held_out], y[~held_out]).predict(x[held_out])
    if _is_constant(prediction):
        return math.nan, f"{label} Pearson r undefined: the held-out predictions are constant"
    if _is_constant(y):
        return math.nan, f"{label} Pearson r undefined: the target is constant"
    return float(np.corrcoef(prediction, y)[0, 1]), None


def _scores(frame: pd.DataFrame, features: Sequence[str], target: str, alpha: float,
            impute: bool = False) -> tuple[dict[str, float], list[str]]:
    """The three scores of one feature set on one table (free of missing values unless ``impute``)."""
    x = frame[list(features)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    y = frame[target].to_numpy(dtype=float)
    notes: list[str] = []
    scores: dict[str, float] = {}
    scores["r2_in_sample"], note = _in_sample_r2(x, y, alpha, impute)
    notes += [note] if note else []
    for key, column, label in (("loso_pearson", "scale", "LOSO"), ("lomo_pearson", "method", "LOMO")):
        groups = frame[column].to_numpy() if column in frame.columns else None
        scores[key], note = _held_out_pearson(x, y, groups, alpha, label, column + "s", impute)
        notes += [note] if note else []
    return scores, notes


def _seed_replicates(table: pd.DataFrame) -> list[pd.DataFrame]:
    """The per-replicate tables (see the module docstring); empty when every run has one seed."""
    keys = [c for c in ("method", "scale") if c in table.columns]
    if table.empty or "seed" not in table.columns or not keys:
        return []
    if table.groupby(keys, dropna=False).size().max() < 2:
        return []
    order = table.sort_values("seed", kind="stable")
    replicate = order.groupby(keys, dropna=False).cumcount()
    return [order[replicate == k] for k in range(int(replicate.max()) + 1)]


def _seed_averaged(table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    keys = [c for c in ("method", "scale") if c in table.columns]
    return table.groupby(keys, dropna=False, sort=True)[list(columns)].mean().reset_index()


def _finite(table: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    return np.isfinite(table[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float))


def _fit_rows(table: pd.DataFrame, feature_sets: Mapping[str, Sequence[str]], target: str, missing: str
              ) -> tuple[pd.DataFrame, str]:
    """The runs every feature set is fit on, and a sentence saying which and why."""
    usable = [f for f in dict.fromkeys(f for features in feature_sets.values() for f in features)
              if f in table.columns and _finite(table, [f]).any()]
    with_target = table[_finite(table, [target]).all(axis=1)] if target in table.columns else table.iloc[0:0]
    lost = len(table) - len(with_target)
    head = f"{lost} of {len(table)} runs have no {target}; " if lost else ""
    if missing == "impute":
        n_missing = int((~_finite(with_target, usable)).sum()) if usable else 0
        return with_target, (f"{head}every feature set fit on the same {len(with_target)} runs; "
                             f"{n_missing} missing feature values imputed with the training mean")
    keep = _finite(with_target, usable).all(axis=1) if usable else np.ones(len(with_target), dtype=bool)
    rows = with_target[keep]
    dropped = with_target[~keep]
    names = ", ".join(map(str, dropped["run"])) if "run" in dropped.columns else f"{len(dropped)} runs"
    detail = f"; dropped for a missing feature: {names}" if len(dropped) else ""
    return rows, f"{head}every feature set fit on the same {len(rows)} runs{detail}"


def fit_predictors(
    table: pd.DataFrame,
    target: str = "downstream_acc",
    feature_sets: Mapping[str, Sequence[str]] | None = None,
    alpha: float = 1.0,
    missing: str = "common",
) -> pd.DataFrame:
    """One row per feature set (column `feature_set`, in the order given): in-sample R²,
    LOSO and LOMO Pearson r, and a `note`.

    `table` has one row per run: the target column, the feature columns, `scale` and `method`
    (the grouping columns of LOSO and LOMO), optionally `seed` and `run`. Every set is fit on the
    same runs (`missing`, see the module docstring); `n_rows` counts them and `n_dropped` the runs
    left out. With several seeds per (method, scale) the row also carries `<score>_mean`,
    `<score>_std` and `n_replicates` (see the module docstring for how replicates are formed).
    """
    from rankscope.errors import AnalysisError

    if target not in table.columns:
        raise AnalysisError(f"the table has no target column {target!r}; columns: {', '.join(map(str, table.columns))}")
    if not alpha >= 0:
        raise AnalysisError(f"alpha must be ≥ 0 (got {alpha})")
    if missing not in MISSING_RULES:
        raise AnalysisError(f"unknown missing-feature rule {missing!r}; use {' or '.join(MISSING_RULES)}")
    feature_sets = DEFAULT_FEATURE_SETS if feature_sets is None else feature_sets
    impute = missing == "impute"
    fit_table, rows_note = _fit_rows(table, feature_sets, target, missing)
    replicates_all = _seed_replicates(table)
    rows = []
    for name, features in feature_sets.items():
        features = list(features)
        notes: list[str] = [rows_note]
        absent = [c for c in features if c not in table.columns]
        empty = [c for c in features if c in table.columns and not _finite(table, [c]).any()]
        row: dict[str, object] = {"feature_set": name, "features": ",".join(features), "missing": missing}
        if absent or empty:
            if absent:
                notes.append(f"missing feature columns: {', '.join(absent)}")
            if empty:
                notes.append(f"no run has a value for: {', '.join(empty)}")
            complete = fit_table.iloc[0:0]
        else:
            complete = fit_table
        row.update(n_rows=len(complete), n_dropped=len(table) - len(complete))
        replicates = _seed_replicates(complete) if replicates_all else []
        scored = _seed_averaged(complete, features + [target]) if replicates else complete
        if replicates:
            notes.append(f"main scores on the seed-averaged table ({len(scored)} (method, scale) cells)")
        if len(scored):
            scores, score_notes = _scores(scored, features, target, alpha, impute)
            notes += score_notes
        else:
            scores = {key: math.nan for key in SCORES}
            notes.append("no complete rows to fit")
        row.update(scores)
        if replicates_all:
            per_replicate = [_scores(rep, features, target, alpha, impute)[0] for rep in replicates if len(rep)]
            row["n_replicates"] = len(per_replicate)
            for key in SCORES:
                values = [s[key] for s in per_replicate if not math.isnan(s[key])]
                row[f"{key}_mean"] = float(np.mean(values)) if values else math.nan
                row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) >= 2 else math.nan
            if per_replicate and any(math.isnan(s[key]) for s in per_replicate for key in SCORES):
                notes.append("some per-seed scores undefined (left out of mean ± std)")
        row["note"] = "; ".join(notes)
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["GEOMETRY_FEATURES", "DEFAULT_FEATURE_SETS", "MISSING_RULES", "SCORES", "fit_predictors"]
