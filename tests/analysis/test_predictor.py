"""The downstream-quality predictor: ridge on standardized features, R², LOSO and LOMO Pearson r."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from rankscope.analysis.predictor import GEOMETRY_FEATURES, fit_predictors

METHODS = ["full", "galore", "lora", "cola"]
SCALES = ["20m", "60m", "130m"]


def _table(seeds=(0,), noise: float = 0.0, rng_seed: int = 0) -> pd.DataFrame:
    """One row per (method, scale, seed); the target is an exact linear function of val_loss."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for method in METHODS:
        for scale in SCALES:
            for seed in seeds:
                row = {"method": method, "scale": scale, "seed": seed, "val_loss": rng.uniform(3.0, 5.0)}
                row.update({name: rng.normal() for name in GEOMETRY_FEATURES})
                row["downstream_acc"] = 0.9 - 0.1 * row["val_loss"] + noise * rng.normal()
                rows.append(row)
    return pd.DataFrame(rows)


def _by_set(result: pd.DataFrame) -> pd.DataFrame:
    return result.set_index("feature_set")


def test_geometry_features_are_the_eight_of_the_spec():
    assert GEOMETRY_FEATURES == ["es_random", "dv_random", "es_singular_top1", "es_singular_top5",
                                 "imbh_to_full", "effective_rank_w", "stable_rank_w", "cka_to_reference"]


def test_val_loss_predicts_a_linear_target_almost_perfectly():
    result = _by_set(fit_predictors(_table(), alpha=1.0))
    assert list(result.index) == ["val_loss", "geometry", "val_loss+geometry"]
    row = result.loc["val_loss"]
    assert row["r2_in_sample"] > 0.99
    # each fold shrinks its slope a little differently, so held-out r is just under 1
    assert row["loso_pearson"] > 0.999
    assert row["lomo_pearson"] > 0.999
    assert row["n_rows"] == 12 and row["n_dropped"] == 0
    assert row["note"] == "every feature set fit on the same 12 runs"
    # geometry here is noise: it must not look as good out of sample
    assert result.loc["geometry", "loso_pearson"] < 0.9


def test_in_sample_r2_matches_the_closed_form_ridge_shrinkage():
    """One standardized feature, exact linear target: ridge shrinks the slope by n/(n+alpha)
    (the scaler uses the population std, so x'x = n), hence R² = 1 - (alpha/(n+alpha))²."""
    table = _table()
    n = len(table)
    for alpha in (0.5, 1.0, 6.0):
        r2 = _by_set(fit_predictors(table, feature_sets={"val_loss": ["val_loss"]}, alpha=alpha)).loc["val_loss", "r2_in_sample"]
        assert r2 == pytest.approx(1 - (alpha / (n + alpha)) ** 2, abs=1e-10)


def test_held_out_pearson_matches_a_numpy_ridge():
    """LOSO with numpy's own ridge (standardize on the training fold, closed-form solve)."""
    table = _table(noise=0.05, rng_seed=3)
    features = ["val_loss", "es_random", "stable_rank_w"]
    alpha = 2.0
    x, y, groups = table[features].to_numpy(), table["downstream_acc"].to_numpy(), table["scale"].to_numpy()
    prediction = np.empty_like(y)
    for scale in SCALES:
        train = groups != scale
        mean, std = x[train].mean(0), x[train].std(0)
        z = (x[train] - mean) / std
        weights = np.linalg.solve(z.T @ z + alpha * np.eye(len(features)), z.T @ (y[train] - y[train].mean()))
        prediction[~train] = ((x[~train] - mean) / std) @ weights + y[train].mean()
    expected = np.corrcoef(prediction, y)[0, 1]
    got = _by_set(fit_predictors(table, feature_sets={"s": features}, alpha=alpha)).loc["s", "loso_pearson"]
    assert got == pytest.approx(expected, abs=1e-10)


def test_one_scale_gives_nan_loso_with_a_note():
    table = _table()
    one_scale = table[table["scale"] == "60m"]
    row = _by_set(fit_predictors(one_scale)).loc["val_loss"]
    assert math.isnan(row["loso_pearson"])
    assert "cannot be computed: needs ≥ 2 scales (have 1)" in row["note"]
    assert not math.isnan(row["lomo_pearson"])  # four methods remain


def test_one_method_gives_nan_lomo_with_a_note():
    table = _table()
    row = _by_set(fit_predictors(table[table["method"] == "lora"])).loc["val_loss"]
    assert math.isnan(row["lomo_pearson"])
    assert "needs ≥ 2 methods (have 1)" in row["note"]
    assert not math.isnan(row["loso_pearson"])


def test_constant_held_out_predictions_give_nan_pearson():
    table = _table()
    table["flat"] = 1.0  # a constant feature: every fold predicts its training mean...
    table["downstream_acc"] = np.where(table["scale"] == "20m", 0.3, 0.5)
    # ...and with LOMO every training fold has the same target mean, so predictions are constant
    row = _by_set(fit_predictors(table, feature_sets={"flat": ["flat"]})).loc["flat"]
    assert math.isnan(row["lomo_pearson"])
    assert "predictions are constant" in row["note"]


def test_every_feature_set_is_fit_on_the_same_runs():
    # Bug: CoLA (no IMBH) used to be in the val-loss-only fit but not in the geometry fits, so the
    # three rows scored different runs. Now a run missing any feature leaves every set.
    table = _table(noise=0.05, rng_seed=2)
    table["run"] = [f"{m}-{s}" for m, s in zip(table["method"], table["scale"])]
    table.loc[table["method"] == "cola", "imbh_to_full"] = np.nan
    result = _by_set(fit_predictors(table))
    assert set(result["n_rows"]) == {9} and set(result["n_dropped"]) == {3}
    for name in result.index:
        assert "every feature set fit on the same 9 runs; dropped for a missing feature: cola-20m, cola-60m, cola-130m" in \
            result.loc[name, "note"]
    without_cola = table[table["method"] != "cola"]
    alone = _by_set(fit_predictors(without_cola, feature_sets={"val_loss": ["val_loss"]})).loc["val_loss"]
    for score in ("r2_in_sample", "loso_pearson", "lomo_pearson"):
        assert result.loc["val_loss", score] == pytest.approx(alone[score], abs=1e-12)

    without_column = table.drop(columns=["imbh_to_full"])
    row = _by_set(fit_predictors(without_column)).loc["geometry"]
    assert math.isnan(row["r2_in_sample"]) and "imbh_to_full" in row["note"]
    # A feature no run has does not drop runs from the sets that do not use it.
    empty = table.assign(imbh_to_full=np.nan)
    result = _by_set(fit_predictors(empty))
    assert result.loc["val_loss", "n_rows"] == 12 and not math.isnan(result.loc["val_loss", "r2_in_sample"])
    assert "no run has a value for: imbh_to_full" in result.loc["geometry", "note"]


def test_impute_keeps_every_run_and_fills_features_inside_each_fold():
    table = _table(noise=0.05, rng_seed=2)
    table.loc[table["method"] == "cola", "imbh_to_full"] = np.nan
    result = _by_set(fit_predictors(table, missing="impute"))
    assert set(result["n_rows"]) == {12} and set(result["missing"]) == {"impute"}
    assert "3 missing feature values imputed" in result.loc["geometry", "note"]
    # Imputation happens inside each fit: the in-sample fit equals an explicit mean fill.
    filled = table.assign(imbh_to_full=table["imbh_to_full"].fillna(table["imbh_to_full"].mean()))
    explicit = _by_set(fit_predictors(filled)).loc["geometry", "r2_in_sample"]
    assert result.loc["geometry", "r2_in_sample"] == pytest.approx(explicit, abs=1e-12)
    with pytest.raises(ValueError, match="missing-feature rule"):
        fit_predictors(table, missing="drop")


def test_several_seeds_report_mean_and_std_over_per_seed_fits():
    table = _table(seeds=(11, 12, 13), noise=0.02, rng_seed=5)
    result = _by_set(fit_predictors(table, feature_sets={"val_loss": ["val_loss"]}))
    row = result.loc["val_loss"]
    assert row["n_replicates"] == 3
    per_seed = [
        _by_set(fit_predictors(table[table["seed"] == seed].drop(columns="seed"),
                               feature_sets={"val_loss": ["val_loss"]})).loc["val_loss"]
        for seed in (11, 12, 13)
    ]
    for score in ("r2_in_sample", "loso_pearson", "lomo_pearson"):
        values = [r[score] for r in per_seed]
        assert row[f"{score}_mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert row[f"{score}_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    # the main scores use the seed-averaged table: one row per (method, scale)
    averaged = table.groupby(["method", "scale"])[["val_loss", "downstream_acc"]].mean().reset_index()
    expected = _by_set(fit_predictors(averaged, feature_sets={"val_loss": ["val_loss"]})).loc["val_loss"]
    assert row["r2_in_sample"] == pytest.approx(expected["r2_in_sample"], abs=1e-12)
    assert "seed-averaged" in row["note"]


def test_missing_target_column_raises():
    with pytest.raises(ValueError, match="downstream_acc"):
        fit_predictors(_table().drop(columns="downstream_acc"))


def test_a_feature_set_whose_rows_are_all_incomplete_is_reported_not_crashing():
    import math

    import pandas as pd

    from rankscope.analysis.predictor import fit_predictors

    table = pd.DataFrame({
        "method": ["full", "lowrank", "full", "lowrank"], "scale": ["tiny"] * 4, "seed": [0, 0, 1, 1],
        "val_loss": [3.0, 4.0, 3.1, 4.2], "downstream_acc": [0.4, 0.3, 0.41, 0.29],
        "es_random": [math.nan] * 4,
    })
    result = fit_predictors(table, feature_sets={"geometry": ["es_random"]})
    row = result.iloc[0]
    assert row["n_rows"] == 0 and row["n_dropped"] == 4
    assert math.isnan(row["r2_in_sample"])
