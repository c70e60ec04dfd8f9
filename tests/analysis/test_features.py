"""The predictor's feature table read from analysis tables: the study's definitions, the primary
scope only, and CoLA's features present wherever they are defined."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest

from rankscope.analysis.features import predictor_table

STEP = 100
KEYS = {"step": STEP}


def _planned(name: str, method: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, method=method, preset="tiny", seed=0, config=SimpleNamespace(train=SimpleNamespace(steps=STEP)))


def _write_run(root, name: str, method: str, spectral_rows: list[dict], imbh_applicable: bool) -> None:
    run = root / name
    (run / "analysis").mkdir(parents=True)
    (run / "eval").mkdir()
    (run / "summary.json").write_text(json.dumps({"val_loss": 5.0}))
    (run / "eval" / f"step_{STEP:06d}.json").write_text(json.dumps({"mean_acc": 0.4}))
    landscape = []
    for scope, shift in (("all", 0.0), ("blocks", 100.0)):  # a second scope with very different numbers
        landscape += [
            {**KEYS, "direction_set": "random", "k_max": None, "scope": scope, "metric": "expected_sharpness", "value": 1.0 + shift},
            {**KEYS, "direction_set": "random", "k_max": None, "scope": scope, "metric": "direction_variance", "value": 2.0 + shift},
            {**KEYS, "direction_set": "singular", "k_max": 1, "scope": scope, "metric": "expected_sharpness", "value": 3.0 + shift},
            {**KEYS, "direction_set": "singular", "k_max": 5, "scope": scope, "metric": "expected_sharpness", "value": 4.0 + shift},
        ]
    frame = pd.DataFrame(landscape)
    frame["k_max"] = frame["k_max"].astype("Int64")  # as the pipeline writes it: empty for random
    frame.to_csv(run / "analysis" / "landscape.csv", index=False)
    pd.DataFrame([{**KEYS, **row} for row in spectral_rows]).to_csv(run / "analysis" / "spectral.csv", index=False)
    imbh = {**KEYS, "kind": "imbh", "step_a": STEP, "step_b": STEP, "other_run": "full-tiny-s0", "other_method": "full",
            "space": "dense", "applicable": imbh_applicable, "barrier": 0.5 if imbh_applicable else math.nan,
            "reason": "" if imbh_applicable else "method 'cola' has no dense equivalent (nonlinear factorization)"}
    pd.DataFrame([imbh]).to_csv(run / "analysis" / "interpolation.csv", index=False)
    similarity = [{**KEYS, "reference_run": "full-tiny-s0", "layer": layer, "metric": "cka", "value": 0.9, "applicable": True,
                   "reason": ""} for layer in (0, 1)]
    pd.DataFrame(similarity).to_csv(run / "analysis" / "similarity.csv", index=False)


def _spectral(target: str, erank: float, srank: float, applicable: bool = True) -> list[dict]:
    return [{"target": target, "matrix": "mean", "layer": -1, "metric": metric, "value": value if applicable else math.nan,
             "applicable": applicable, "reason": "" if applicable else "cola has no dense weight"}
            for metric, value in (("effective_rank", erank), ("stable_rank", srank))]


@pytest.fixture
def table(tmp_path):
    _write_run(tmp_path, "relora-tiny-s0", "relora",
               _spectral("W_native", 55.6, 3.0) + _spectral("W", 110.8, 9.0), imbh_applicable=True)
    _write_run(tmp_path, "cola-tiny-s0", "cola",
               _spectral("W_native", 20.0, 2.0) + _spectral("W", 0, 0, applicable=False), imbh_applicable=False)
    return predictor_table([_planned("relora-tiny-s0", "relora"), _planned("cola-tiny-s0", "cola")], tmp_path).set_index("run")


def test_rank_features_use_the_studys_w_so_cola_has_them(table):
    # Bug: the features read target W (merged) only, so CoLA's ranks were NaN; the study's W is
    # every native matrix (ReLoRA: 55.6, not the merged 110.8).
    assert table.loc["cola-tiny-s0", "effective_rank_w"] == 20.0 and table.loc["cola-tiny-s0", "stable_rank_w"] == 2.0
    assert table.loc["relora-tiny-s0", "effective_rank_w"] == 55.6
    assert table.loc["relora-tiny-s0", "effective_rank_w_merged"] == 110.8
    assert math.isnan(table.loc["cola-tiny-s0", "effective_rank_w_merged"])


def test_singular_sharpness_features_read_the_primary_scope_only(table):
    # Bug: the singular features were not filtered by scope (and never matched k_max read back
    # from CSV as 1.0); now they are the scope-`all` values, like es_random.
    row = table.loc["relora-tiny-s0"]
    assert (row["es_random"], row["dv_random"], row["es_singular_top1"], row["es_singular_top5"]) == (1.0, 2.0, 3.0, 4.0)


def test_a_feature_that_does_not_apply_is_nan_with_its_reason(table):
    assert math.isnan(table.loc["cola-tiny-s0", "imbh_to_full"]) and table.loc["relora-tiny-s0", "imbh_to_full"] == 0.5
    reason = table.loc["cola-tiny-s0", "not_applicable"]
    assert "imbh_to_full: method 'cola' has no dense equivalent" in reason
    assert "effective_rank_w_merged: cola has no dense weight" in reason
    assert table.loc["relora-tiny-s0", "not_applicable"] == ""
    assert table.loc["cola-tiny-s0", "cka_to_reference"] == pytest.approx(0.9)


def _hessian_rows(max_converged: bool = True, trace_converged: bool = True) -> list[dict]:
    lanczos = "Lanczos did not converge in 3 HVPs (relative residual 0.31 > tolerance 0.01) — raise hessian_iterations"
    wide = "Hutchinson standard error 26 is 16.0% of |trace| 163 after 2 samples (> 10% allowed) — raise hessian_samples"
    rows = [("max_eigenvalue", 9.5, math.nan, max_converged, "" if max_converged else lanczos),
            ("min_eigenvalue", -1.5, math.nan, True, ""),
            ("trace", 163.0, 26.0 if not trace_converged else 4.0, trace_converged, "" if trace_converged else wide)]
    return [{**KEYS, "scope": "all", "metric": metric, "value": value, "standard_error": se, "hvps": 3, "converged": ok,
             "applicable": True, "reason": reason} for metric, value, se, ok, reason in rows]


def _with_hessian(tmp_path, rows_by_run: dict[str, list[dict]]) -> pd.DataFrame:
    planned = []
    for name, rows in rows_by_run.items():
        method = name.split("-")[0]
        _write_run(tmp_path, name, method, _spectral("W_native", 10.0, 2.0), imbh_applicable=True)
        pd.DataFrame(rows).to_csv(tmp_path / name / "analysis" / "hessian.csv", index=False)
        planned.append(_planned(name, method))
    return predictor_table(planned, tmp_path).set_index("run")


def test_hessian_features_are_the_algebraic_extremes_and_the_trace(tmp_path):
    row = _with_hessian(tmp_path, {"lora-tiny-s0": _hessian_rows()}).loc["lora-tiny-s0"]
    assert (row["hessian_max_eigenvalue"], row["hessian_min_eigenvalue"], row["hessian_trace"]) == (9.5, -1.5, 163.0)
    assert row["unconverged"] == "" and row["not_applicable"] == ""


def test_an_unconverged_estimate_is_listed_with_its_reason_kept_raw_for_tables_and_nan_for_the_predictor(tmp_path):
    from rankscope.analysis.features import final_features, read_tables

    table = _with_hessian(tmp_path, {"lora-tiny-s0": _hessian_rows(max_converged=False, trace_converged=False)})
    features = final_features(read_tables(tmp_path / "lora-tiny-s0"), "lora-tiny-s0", "lora")
    # The tables' view: the raw estimate, marked.
    assert features["hessian_max_eigenvalue"] == 9.5 and features["hessian_trace"] == 163.0
    assert features["unconverged"] == (
        "hessian_max_eigenvalue: Lanczos did not converge in 3 HVPs (relative residual 0.31 > tolerance 0.01) — "
        "raise hessian_iterations; "
        "hessian_trace: Hutchinson standard error 26 is 16.0% of |trace| 163 after 2 samples (> 10% allowed) — "
        "raise hessian_samples")
    # One "feature: reason" entry per feature, as the report splits them (on ";", then ": ").
    assert [part.split(": ")[0] for part in features["unconverged"].split("; ")] == ["hessian_max_eigenvalue", "hessian_trace"]
    # The predictor's view: no unconverged estimate, the converged one kept.
    row = table.loc["lora-tiny-s0"]
    assert math.isnan(row["hessian_max_eigenvalue"]) and math.isnan(row["hessian_trace"])
    assert row["hessian_min_eigenvalue"] == -1.5
    assert row["unconverged"] == features["unconverged"]


def test_an_older_hessian_table_loads_as_unusable_with_a_reason(tmp_path):
    # Written by the power-iteration stage: `top_eigenvalue` (largest magnitude) and an unchecked trace.
    old = [{**KEYS, "scope": "all", "metric": "top_eigenvalue", "value": -76.7, "standard_error": math.nan, "hvps": 3,
            "converged": False, "applicable": True, "reason": ""},
           {**KEYS, "scope": "all", "metric": "trace", "value": 163.0, "standard_error": 26.0, "hvps": 2,
            "converged": True, "applicable": True, "reason": ""}]
    row = _with_hessian(tmp_path, {"lora-tiny-s0": old}).loc["lora-tiny-s0"]
    assert math.isnan(row["hessian_max_eigenvalue"]) and math.isnan(row["hessian_min_eigenvalue"])
    assert math.isnan(row["hessian_trace"])  # the predictor's view; final_features keeps 163 marked
    assert "hessian_max_eigenvalue: largest-magnitude estimate from an older analysis — re-run rankscope analyze" in row["unconverged"]
    assert "hessian_min_eigenvalue: largest-magnitude estimate from an older analysis" in row["unconverged"]
    assert "hessian_trace: trace from an older analysis that did not check its standard error" in row["unconverged"]


def test_a_model_without_double_backward_has_its_hessian_features_not_applicable(tmp_path):
    reason = "no Hessian-vector product for this model: derivative for foo is not implemented"
    rows = [{**KEYS, "scope": "all", "metric": metric, "value": math.nan, "standard_error": math.nan, "hvps": 0,
             "converged": False, "applicable": False, "reason": reason} for metric in ("max_eigenvalue", "min_eigenvalue", "trace")]
    row = _with_hessian(tmp_path, {"lora-tiny-s0": rows}).loc["lora-tiny-s0"]
    assert row["unconverged"] == ""  # not applicable is no convergence failure
    for name in ("hessian_max_eigenvalue", "hessian_min_eigenvalue", "hessian_trace"):
        assert math.isnan(row[name]) and f"{name}: {reason}" in row["not_applicable"]


def test_the_predictor_copes_with_unconverged_hessian_features(tmp_path):
    from rankscope.analysis.predictor import fit_predictors

    runs = {f"{method}-tiny-s{seed}": _hessian_rows(max_converged=(method != "lora" or seed == 0))
            for method in ("relora", "lora", "galore") for seed in (0, 1)}
    table = _with_hessian(tmp_path, runs).reset_index()
    table["downstream_acc"] = [0.30, 0.32, 0.35, 0.31, 0.40, 0.41]
    table["scale"] = ["tiny", "small"] * 3
    assert table["hessian_max_eigenvalue"].isna().sum() == 1  # lora seed 1
    sets = {"hessian": ["hessian_max_eigenvalue", "hessian_min_eigenvalue"]}
    common = fit_predictors(table, target="downstream_acc", feature_sets=sets, missing="common").iloc[0]
    assert common["n_rows"] == 5 and "lora-tiny-s1" in common["note"]
    imputed = fit_predictors(table, target="downstream_acc", feature_sets=sets, missing="impute").iloc[0]
    assert imputed["n_rows"] == 6
