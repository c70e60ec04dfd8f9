"""Predict a run's downstream accuracy from validation loss and/or final-checkpoint geometry.

METRICS.md §5: ridge regression on standardized features (sklearn `StandardScaler` + `Ridge`),
scored three ways for each feature set:

- **in-sample R²**: fit on every run, R² of its own predictions;
- **LOSO Pearson r** (leave one scale out): for each model scale, fit on the runs of the other
  scales and predict the held-out scale; Pearson r between all held-out predictions and truth;
- **LOMO Pearson r** (leave one method out): the same with the `method` column.

A score that cannot be computed is NaN with the reason in the row's `note`, never a made-up
number: fewer than 2 scales (or methods), a constant target, constant held-out predictions.

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
_CONSTANT_TOL = 1e-12


def _ridge(alpha: float):
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), Ridge(alpha=alpha))


def _is_constant(values: np.ndarray) -> bool:
    return values.size == 0 or float(np.ptp(values)) <= _CONSTANT_TOL * max(1.0, float(np.max(np.abs(values))))


def _in_sample_r2(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[float, str | None]:
    if len(y) < 2:
        return math.nan, f"R² cannot be computed: needs ≥ 2 runs (have {len(y)})"
    if _is_constant(y):
        return math.nan, "R² undefined: the target is constant"
    prediction = _ridge(alpha).fit(x, y).predict(x)
    residual = float(np.sum((y - prediction) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - residual / total, None


def _held_out_pearson(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, alpha: float,
                      label: str, plural: str) -> tuple[float, str | None]:
    """Pearson r between leave-one-group-out predictions and truth."""
    if groups is None:
        return math.nan, f"{label} cannot be computed: the table has no '{plural[:-1]}' column"
    distinct = pd.unique(groups)
    if len(distinct) < 2:
        return math.nan, f"{label} cannot be computed: needs ≥ 2 {plural} (have {len(distinct)})"
    prediction = np.empty_like(y, dtype=float)
    for group in distinct:
        held_out = groups == group
        prediction[held_out] = _ridge(alpha).fit(x[~held_out], y[~held_out]).predict(x[held_out])
    if _is_constant(prediction):
        return math.nan, f"{label} Pearson r undefined: the held-out predictions are constant"
    if _is_constant(y):
        return math.nan, f"{label} Pearson r undefined: the target is constant"
    return float(np.corrcoef(prediction, y)[0, 1]), None


def _scores(frame: pd.DataFrame, features: Sequence[str], target: str, alpha: float) -> tuple[dict[str, float], list[str]]:
    """The three scores of one feature set on one table (already free of missing values)."""
    x = frame[list(features)].to_numpy(dtype=float)
    y = frame[target].to_numpy(dtype=float)
    notes: list[str] = []
    scores: dict[str, float] = {}
    scores["r2_in_sample"], note = _in_sample_r2(x, y, alpha)
    notes += [note] if note else []
    for key, column, label in (("loso_pearson", "scale", "LOSO"), ("lomo_pearson", "method", "LOMO")):
        groups = frame[column].to_numpy() if column in frame.columns else None
        scores[key], note = _held_out_pearson(x, y, groups, alpha, label, column + "s")
        notes += [note] if note else []
    return scores, notes


def _complete_rows(table: pd.DataFrame, columns: Sequence[str]) -> tuple[pd.DataFrame, int, list[str]]:
    """Rows with every listed column present and finite; (rows, number dropped, absent columns)."""
    absent = [c for c in columns if c not in table.columns]
    if absent:
        return table.iloc[0:0], len(table), absent
    values = table[list(columns)].apply(pd.to_numeric, errors="coerce")
    keep = np.isfinite(values.to_numpy(dtype=float)).all(axis=1)
    return table[keep], int((~keep).sum()), []


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


def fit_predictors(
    table: pd.DataFrame,
    target: str = "downstream_acc",
    feature_sets: Mapping[str, Sequence[str]] | None = None,
    alpha: float = 1.0,
) -> pd.DataFrame:
    """One row per feature set (column `feature_set`, in the order given): in-sample R²,
    LOSO and LOMO Pearson r, and a `note`.

    `table` has one row per run: the target column, the feature columns, `scale` and `method`
    (the grouping columns of LOSO and LOMO), optionally `seed`. Rows missing any feature of a
    set (or the target) are left out of that set's fit and counted in `n_dropped`. With several
    seeds per (method, scale) the row also carries `<score>_mean`, `<score>_std` and
    `n_replicates` (see the module docstring for how replicates are formed).
    """
    if target not in table.columns:
        from rankscope.analysis import AnalysisError

        raise AnalysisError(f"the table has no target column {target!r}; columns: {', '.join(map(str, table.columns))}")
    if not alpha >= 0:
        from rankscope.analysis import AnalysisError

        raise AnalysisError(f"alpha must be ≥ 0 (got {alpha})")
    feature_sets = DEFAULT_FEATURE_SETS if feature_sets is None else feature_sets
    replicates_all = _seed_replicates(table)
    rows = []
    for name, features in feature_sets.items():
        features = list(features)
        complete, n_dropped, absent = _complete_rows(table, features + [target])
        notes: list[str] = []
        if absent:
            notes.append(f"missing feature columns: {', '.join(absent)}")
        elif n_dropped:
            notes.append(f"dropped {n_dropped} of {len(table)} rows with missing features or target")
        replicates = _seed_replicates(complete) if replicates_all else []
        fit_table = _seed_averaged(complete, features + [target]) if replicates else complete
        if replicates:
            notes.append(f"main scores on the seed-averaged table ({len(fit_table)} (method, scale) cells)")
        row: dict[str, object] = {"feature_set": name, "features": ",".join(features),
                                  "n_rows": len(complete), "n_dropped": n_dropped}
        if len(fit_table):
            scores, score_notes = _scores(fit_table, features, target, alpha)
            notes += score_notes
        else:
            scores = {key: math.nan for key in SCORES}
            notes.append("no complete rows to fit")
        row.update(scores)
        if replicates_all:
            per_replicate = [_scores(rep, features, target, alpha)[0] for rep in replicates if len(rep)]
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


__all__ = ["GEOMETRY_FEATURES", "DEFAULT_FEATURE_SETS", "SCORES", "fit_predictors"]
