"""From a scaling table to fits.json, the compute-optimal frontiers, figures and the report.

`analyze_table` is what `rankscope scaling fit TABLE.csv` runs, and what `rankscope scaling
SPEC.yaml` runs on the table its runs produced. Outputs in OUT:
- fits.json: {method: {"E", "A", "alpha", "B", "beta": point estimates, "ci": {name: [low, high]}}}
- compute_optimal.json: per method the FLOPs-per-token models, the exponents a, b of
  N* ∝ C^a, D* ∝ C^b with intervals, and the frontier (N*, D*, loss, inference FLOPs) per budget;
- frontier.csv, fit_details.json (objective, runs, bootstrap draws), figures/, report.md/.html.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from rankscope.config import REFERENCE_METHOD
from rankscope.io import write_json_atomic
from rankscope.scaling.fit import PARAMETERS, FitSettings, MethodFit, fit_table, interval, validate_table
from rankscope.scaling.optimal import (
    INFERENCE_FLOPS,
    TRAIN_FLOPS,
    FlopsModel,
    default_budgets,
    flops_model,
    frontier,
    optimal_exponents,
)

log = logging.getLogger("rankscope.scaling")


def with_compute(table: pd.DataFrame) -> pd.DataFrame:
    """The table with `compute` = training FLOPs of each run (measured FLOPs per token x tokens
    where the table has them, else Chinchilla's 6·N·D)."""
    table = table.copy()
    per_token = pd.to_numeric(table[TRAIN_FLOPS], errors="coerce") if TRAIN_FLOPS in table.columns else None
    dense = 6.0 * table["params"]
    table["compute"] = (per_token.fillna(dense) if per_token is not None else dense) * table["tokens"]
    return table


def _samples_as_laws(fit: MethodFit) -> list[dict]:
    return [dict(zip(PARAMETERS, row)) for row in fit.samples]


def compute_optimal(fits: dict[str, MethodFit], table: pd.DataFrame, budgets, confidence: float) -> tuple[dict, pd.DataFrame]:
    """Per method: FLOPs models, exponents with intervals, and the frontier at `budgets`."""
    result, rows = {}, []
    for method, fit in fits.items():
        mine = table[table["method"] == method]
        train, inference = flops_model(mine, TRAIN_FLOPS, 6.0), flops_model(mine, INFERENCE_FLOPS, 2.0)
        law = fit.law.params()
        a, b = optimal_exponents(law["alpha"], law["beta"], train.gamma)
        samples = _samples_as_laws(fit)
        draws = np.array([optimal_exponents(s["alpha"], s["beta"], train.gamma) for s in samples]).reshape(-1, 2)
        front = frontier(law, train, inference, budgets)
        sample_losses = np.array([frontier(s, train, inference, budgets)["loss"].to_numpy() for s in samples]).reshape(-1, len(front))
        measured = (table["compute"].min(), table["compute"].max())
        front["extrapolated"] = (front["compute"] > measured[1] * 1.0001) | (front["compute"] < measured[0] * 0.9999)
        for i, row in front.iterrows():
            ci = interval(sample_losses[:, i], confidence) if len(sample_losses) else [None, None]
            rows.append({"method": method, **row.to_dict(), "loss_low": _nan(ci[0]), "loss_high": _nan(ci[1])})
        result[method] = {
            "a": a, "a_ci": interval(draws[:, 0], confidence) if len(draws) else [None, None],
            "b": b, "b_ci": interval(draws[:, 1], confidence) if len(draws) else [None, None],
            "train_flops_per_token": train.as_json(), "inference_flops_per_token": inference.as_json(),
            "_samples": sample_losses, "_train": train, "_inference": inference,
        }
    return result, pd.DataFrame(rows)


def compare_to_reference(optimal: dict, front: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """At every budget, each method's predicted loss minus full-rank's (bootstrap interval of the
    difference, the methods' resamples being independent) and its inference cost relative to full."""
    if REFERENCE_METHOD not in optimal:
        return pd.DataFrame()
    reference = front[front["method"] == REFERENCE_METHOD].reset_index(drop=True)
    ref_samples = optimal[REFERENCE_METHOD]["_samples"]
    rows = []
    for method, info in optimal.items():
        if method == REFERENCE_METHOD:
            continue
        mine = front[front["method"] == method].reset_index(drop=True)
        samples = info["_samples"]
        count = min(len(samples), len(ref_samples))
        for i in range(len(mine)):
            difference = samples[:count, i] - ref_samples[:count, i]
            low, high = (_nan(v) for v in interval(difference, confidence)) if count else (math.nan, math.nan)
            rows.append({
                "compute": mine.loc[i, "compute"], "method": method,
                "loss": mine.loc[i, "loss"], "full loss": reference.loc[i, "loss"],
                "difference": mine.loc[i, "loss"] - reference.loc[i, "loss"], "difference_low": low, "difference_high": high,
                "inference cost / full": mine.loc[i, "inference_flops_per_token"] / reference.loc[i, "inference_flops_per_token"],
                "params / full": mine.loc[i, "params"] / reference.loc[i, "params"],
                "extrapolated": bool(mine.loc[i, "extrapolated"]),
            })
    return pd.DataFrame(rows)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _public(optimal: dict) -> dict:
    return {method: {k: v for k, v in info.items() if not k.startswith("_")} for method, info in optimal.items()}


def analyze_table(table: pd.DataFrame, out_dir: str | Path, settings: FitSettings | None = None,
                  budgets=None, title: str = "scaling", notes: list[str] | None = None) -> dict:
    """Fit, derive, draw and report; returns {"fits": fits.json content, "out": out_dir, ...}."""
    settings = settings or FitSettings()
    table = with_compute(validate_table(table))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fits = fit_table(table, settings)
    fits_json = {method: fit.as_json(settings.confidence) for method, fit in fits.items()}
    _write_json(out / "fits.json", fits_json)
    _write_json(out / "fit_details.json", {
        method: {"runs": fit.n_runs, "objective": fit.law.objective, "converged": fit.law.converged,
                 "bootstrap": len(fit.samples), "bootstrap_skipped_unidentified": fit.skipped,
                 "starts": len(settings.starts()), "huber_delta": settings.huber_delta,
                 "confidence": settings.confidence}
        for method, fit in fits.items()})
    budgets = np.asarray(budgets, float) if budgets is not None and len(budgets) else default_budgets(table)
    optimal, front = compute_optimal(fits, table, budgets, settings.confidence)
    # the same frontiers on a fine grid of budgets, for smooth lines in the figures
    _, front_plot = compute_optimal(fits, table, np.logspace(*np.log10([budgets.min(), budgets.max()]), 60),
                                    settings.confidence)
    comparison = compare_to_reference(optimal, front, settings.confidence)
    _write_json(out / "compute_optimal.json", _public(optimal))
    front.to_csv(out / "frontier.csv", index=False)
    from rankscope.scaling.report import write_report

    report = write_report(out, title, table, fits, fits_json, optimal, front_plot, comparison, settings, notes)
    log.info("scaling fits written to %s", out)
    return {"fits": fits_json, "compute_optimal": _public(optimal), "out": out, "report": report}


def _write_json(path: Path, payload) -> None:
    write_json_atomic(path, payload, default=_jsonable)  # strict: NaN and infinities as null


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, FlopsModel):
        return value.as_json()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
