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
