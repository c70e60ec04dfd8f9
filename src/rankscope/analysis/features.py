"""Final-checkpoint features of a run, read from its analysis tables: the predictor's eight
geometry features (METRICS.md §5) and the other run-level numbers the report compares. One
implementation serves both: :func:`predictor_table` (the study's predict stage) and the report.

Every feature uses the study's definition (docs/metrics.md) and the landscape's primary scope
(``all`` when present): expected sharpness and direction variance along random directions,
expected sharpness along the top-1 and top-5 singular directions, IMBH to the full-rank run,
effective and stable rank of the study's W (every native 2-D matrix, defined for every method,
CoLA included) and mean CKA to the reference. `_merged` marks our merged-weight variants. A
feature that does not apply to a run is NaN and ``not_applicable`` says why.

Estimates that can fail to converge (the Hessian's extreme eigenvalues and trace) keep their
value in :func:`final_features`, so a table can show it marked, and ``unconverged`` lists them
with the reason ("feature: reason; ..."); :func:`predictor_table` turns them into NaN, so that
only converged estimates become findings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from rankscope.config import REFERENCE_METHOD
from rankscope.io import read_json

TABLES = ("landscape", "interpolation", "spectral", "similarity", "hessian")

LANDSCAPE_FEATURES = {  # name -> (direction_set, k_max, metric)
    "es_random": ("random", None, "expected_sharpness"),
    "dv_random": ("random", None, "direction_variance"),
    "es_singular_top1": ("singular", 1, "expected_sharpness"),
    "es_singular_top5": ("singular", 5, "expected_sharpness"),
    "dv_singular_top5": ("singular", 5, "direction_variance"),
}
SPECTRAL_FEATURES = {  # name -> (target, matrix, metric)
    "effective_rank_w": ("W_native", "mean", "effective_rank"),
    "stable_rank_w": ("W_native", "mean", "stable_rank"),
    "numerical_rank_ratio_w": ("W_native", "mean", "numerical_rank_ratio"),
    "sv_ratio_w": ("W_native", "mean", "sv_ratio"),
    "effective_rank_w_merged": ("W", "mean", "effective_rank"),
    "stable_rank_w_merged": ("W", "mean", "stable_rank"),
    "effective_rank_dw": ("dW_native", "mean", "effective_rank"),
    "update_ratio_pooled": ("dW_native", "pooled", "relative_fro_norm"),
}
SIMILARITY_FEATURES = {"cka_to_reference": "cka", "cosine_to_reference": "cosine", "relative_l2_to_reference": "relative_l2",
                       "activation_norm": "mean_norm"}  # means over layers; cka_last_layer: the last layer's CKA
# name -> hessian.csv metric: the largest and smallest algebraic eigenvalue (Lanczos) and the trace.
HESSIAN_FEATURES = {"hessian_max_eigenvalue": "max_eigenvalue", "hessian_min_eigenvalue": "min_eigenvalue",
                    "hessian_trace": "trace"}
# hessian.csv written before the Lanczos estimators had one row `top_eigenvalue`: the eigenvalue of
# largest magnitude by power iteration (sign unknown, convergence rarely reached), and a trace
# whose standard error nobody checked.
LEGACY_HESSIAN = {
    "hessian_max_eigenvalue": "largest-magnitude estimate from an older analysis — re-run rankscope analyze",
    "hessian_min_eigenvalue": "largest-magnitude estimate from an older analysis — re-run rankscope analyze",
    "hessian_trace": "trace from an older analysis that did not check its standard error — re-run rankscope analyze",
}



def _number(value: Any) -> float:
    """A number read from JSON, where a missing or non-finite one is null: NaN then."""
    return math.nan if value is None else float(value)

def _is_true(values: pd.Series) -> pd.Series:
    """CSV round trips turn bools into True / 'True' / 'true'; read them all back."""
    return values.astype(str).str.strip().str.lower().isin(["true", "1", "1.0"])


def _select(frame: pd.DataFrame | None, **where: Any) -> pd.DataFrame:
    """Rows matching every ``where`` (numbers compared as numbers: an int column with gaps comes
    back from CSV as floats, 1.0 not "1")."""
    if frame is None or frame.empty:
        return pd.DataFrame()
    mask = pd.Series(True, index=frame.index)
    for key, value in where.items():
        if key not in frame.columns:
            return frame.iloc[0:0]
        column = frame[key]
        mask &= (pd.to_numeric(column, errors="coerce") == value) if isinstance(value, (int, float)) else (column.astype(str) == str(value))
    return frame[mask]


def _at_step(frame: pd.DataFrame, step: int | None, column: str = "step") -> pd.DataFrame:
    """Rows at ``step`` (None: the last step the frame has)."""
    if frame.empty or column not in frame.columns:
        return frame.iloc[0:0] if not frame.empty else frame
    steps = pd.to_numeric(frame[column], errors="coerce")
    return frame[steps == (steps.max() if step is None else step)]


def _mean(frame: pd.DataFrame, column: str = "value") -> float:
    """Mean of the applicable rows' ``column``; NaN when there is none."""
    if frame.empty or column not in frame.columns:
        return math.nan
    if "applicable" in frame.columns:
        frame = frame[_is_true(frame["applicable"])]
    numbers = pd.to_numeric(frame[column], errors="coerce").dropna()
    return float(numbers.mean()) if len(numbers) else math.nan


def _primary_scope(frame: pd.DataFrame | None) -> pd.DataFrame | None:
    if frame is None or frame.empty or "scope" not in frame.columns:
        return frame
    scopes = frame["scope"].dropna().astype(str).unique().tolist()
    return frame[frame["scope"].astype(str) == ("all" if "all" in scopes else scopes[0])] if scopes else frame


def _same_seed(frame: pd.DataFrame) -> pd.DataFrame:
    """The comparisons with the reference of the run's own seed (pairing self or same-seed), as
    the study defines "to the reference"; the cross-seed rows are read against the seed baseline
    by the report. Tables written before the pairing column had only those rows."""
    if frame.empty or "pairing" not in frame.columns:
        return frame
    return frame[frame["pairing"].astype(str).isin(["self", "same-seed"])]


def _imbh_to_full(interpolation: pd.DataFrame | None, run: str) -> pd.DataFrame:
    rows = _same_seed(_select(interpolation, kind="imbh", other_method=REFERENCE_METHOD))
    if "other_run" in rows.columns:  # a run interpolated with itself is a sanity check, not a pair
        rows = rows[rows["other_run"].astype(str) != run]
    return rows


def _reason(rows: pd.DataFrame) -> str | None:
    if rows.empty or "applicable" not in rows.columns:
        return None
    reasons = rows.loc[~_is_true(rows["applicable"]), "reason"].dropna().astype(str) if "reason" in rows.columns else pd.Series()
    return sorted(set(reasons))[0] if len(reasons) else None


def _unconverged(rows: pd.DataFrame) -> str | None:
    """The reason an applicable estimate did not converge (None when every row converged)."""
    if rows.empty or "converged" not in rows.columns:
        return None
    if "applicable" in rows.columns:
        rows = rows[_is_true(rows["applicable"])]
    failed = rows[~_is_true(rows["converged"])]
    if failed.empty:
        return None
    reasons = failed["reason"].dropna().astype(str) if "reason" in failed.columns else pd.Series(dtype=str)
    reasons = sorted({r for r in reasons if r.strip()})
    return reasons[0] if reasons else "did not converge"


def _hessian_features(hessian: pd.DataFrame | None, step: int | None) -> tuple[dict[str, float], dict[str, str | None],
                                                                              dict[str, str | None]]:
    """The Hessian features (raw estimates, converged or not), why any does not apply, and why
    any did not converge. A table from before the Lanczos estimators has no extreme eigenvalues
    (NaN) and an unchecked trace (kept, listed as unconverged)."""
    legacy = not _select(hessian, metric="top_eigenvalue").empty and _select(hessian, metric="max_eigenvalue").empty
    values, not_applicable, unconverged = {}, {}, {}
    for name, metric in HESSIAN_FEATURES.items():
        if legacy and metric != "trace":
            metric = "top_eigenvalue"  # read only for its applicability
        rows = _at_step(_select(hessian, metric=metric), step)
        values[name] = math.nan if metric == "top_eigenvalue" else _mean(rows)
        not_applicable[name] = _reason(rows)
        if legacy:
            applicable = not rows.empty and not_applicable[name] is None
            unconverged[name] = LEGACY_HESSIAN[name] if applicable else None
        else:
            unconverged[name] = _unconverged(rows)
    return values, not_applicable, unconverged


def final_features(tables: Mapping[str, pd.DataFrame | None], run: str, method: str, step: int | None = None) -> dict[str, Any]:
    """The features of one run (its rows of each analysis table) at ``step`` (None: each table's
    last step). Similarity and IMBH are to the full-rank run of the run's own seed; the full-rank
    run's own IMBH to full-rank is 0 and its CKA 1 (the predictor's; the report shows the seed
    baseline in their place)."""
    landscape = _primary_scope(tables.get("landscape"))
    interpolation, spectral = tables.get("interpolation"), tables.get("spectral")
    similarity, hessian = tables.get("similarity"), _primary_scope(tables.get("hessian"))
    similarity = _same_seed(similarity) if similarity is not None else None
    out: dict[str, Any] = {}
    for name, (direction_set, k_max, metric) in LANDSCAPE_FEATURES.items():
        where = {"direction_set": direction_set, "metric": metric, **({"k_max": k_max} if k_max else {})}
        out[name] = _mean(_at_step(_select(landscape, **where), step))
    out["ccbh_final"] = _mean(_at_step(_select(interpolation, kind="ccbh"), step, "step_b"), "barrier")
    to_full = _at_step(_imbh_to_full(interpolation, run), step)
    out["imbh_to_full"] = 0.0 if method == REFERENCE_METHOD else _mean(to_full, "barrier")
    for name, (target, matrix, metric) in SPECTRAL_FEATURES.items():
        out[name] = _mean(_at_step(_select(spectral, target=target, matrix=matrix, metric=metric), step))
    for name, metric in SIMILARITY_FEATURES.items():
        out[name] = _mean(_at_step(_select(similarity, metric=metric), step))
    cka = _at_step(_select(similarity, metric="cka"), step)
    out["cka_last_layer"] = _mean(_select(cka, layer=float(pd.to_numeric(cka["layer"]).max()))) if not cka.empty else math.nan
    hessian_values, hessian_not_applicable, unconverged = _hessian_features(hessian, step)
    out.update(hessian_values)

    reasons = {
        "imbh_to_full": _reason(to_full) if method != REFERENCE_METHOD else None,
        "effective_rank_w_merged": _reason(_at_step(_select(spectral, target="W"), step)),
        "cka_to_reference": _reason(cka),
        "cka_last_layer": _reason(cka),
        **hessian_not_applicable,
    }
    out["not_applicable"] = "; ".join(f"{feature}: {reason}" for feature, reason in reasons.items() if reason)
    # Same format; a feature listed here has a value, but it is no finding (predictor_table drops it).
    # ";" separates entries, so a reason never carries one.
    out["unconverged"] = "; ".join(f"{feature}: {reason.replace(';', ',')}" for feature, reason in unconverged.items() if reason)
    return out


def unconverged_features(text: str) -> list[str]:
    """The feature names of an ``unconverged`` (or ``not_applicable``) string."""
    return [part.partition(": ")[0].strip() for part in str(text or "").split(";") if part.strip()]


def read_tables(run_dir: Path) -> dict[str, pd.DataFrame | None]:
    """A run's analysis tables (None for those it does not have)."""
    paths = {name: run_dir / "analysis" / f"{name}.csv" for name in TABLES}
    return {name: pd.read_csv(path) if path.is_file() else None for name, path in paths.items()}


def predictor_table(planned: Iterable[Any], runs_dir: Path) -> pd.DataFrame:
    """One row per trained run of a study (``planned``: objects with name, method, preset, seed and
    config.train.steps, as `rankscope.study.PlannedRun`): validation loss, downstream accuracy and
    the features at the final checkpoint. A feature listed in ``unconverged`` is NaN here (the
    predictor's missing-feature rule then drops or imputes it): no fit reads an unconverged estimate."""
    rows = []
    for run in planned:
        run_dir = Path(runs_dir) / run.name
        if not (run_dir / "summary.json").is_file():
            continue
        step = run.config.train.steps
        eval_path = run_dir / "eval" / f"step_{step:06d}.json"
        features = final_features(read_tables(run_dir), run.name, run.method, step)
        for name in unconverged_features(features["unconverged"]):
            features[name] = math.nan
        rows.append({
            "run": run.name, "method": run.method, "scale": run.preset, "seed": run.seed,
            "val_loss": _number(read_json(run_dir / "summary.json", expect=dict).get("val_loss")),
            "downstream_acc": _number(read_json(eval_path, missing={}, expect=dict).get("mean_acc")),
            **features,
        })
    return pd.DataFrame(rows)


__all__ = ["HESSIAN_FEATURES", "LANDSCAPE_FEATURES", "SIMILARITY_FEATURES", "SPECTRAL_FEATURES", "final_features",
           "predictor_table", "read_tables", "unconverged_features"]
