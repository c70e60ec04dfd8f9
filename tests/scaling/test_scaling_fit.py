"""The approach-3 fitter: known law recovered from noisy synthetic runs within its own bootstrap
intervals, refusals of data that cannot identify the law, table validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scaling_synthetic import COARSE, TRUTH, synthetic

from rankscope.scaling.fit import (
    HOFFMANN_GRID,
    PARAMETERS,
    FitSettings,
    ScalingFitError,
    _as_fit,
    bootstrap_fits,
    fit_law,
    fit_table,
    huber_objective,
    validate_table,
)


def test_a_known_law_is_recovered_within_its_bootstrap_interval():
    fits = fit_table(synthetic(), FitSettings(bootstrap=150, grid=COARSE, seed=0))
    result = fits["m"].as_json(0.95)
    assert set(result) == set(PARAMETERS) | {"ci"}
    for name, true in TRUTH.items():
        low, high = result["ci"][name]
        assert low <= true <= high, f"{name}: {true} outside [{low}, {high}]"
        assert low <= result[name] <= high
    assert result["alpha"] == pytest.approx(TRUTH["alpha"], rel=0.05)
    assert result["beta"] == pytest.approx(TRUTH["beta"], rel=0.05)
    assert result["E"] == pytest.approx(TRUTH["E"], rel=0.05)
    # Without noise the law is recovered to the optimizer's precision.
    exact = fit_table(synthetic(noise=0.0), FitSettings(bootstrap=0, grid=COARSE))["m"].law
    for name, true in TRUTH.items():
        assert getattr(exact, name) == pytest.approx(true, rel=1e-3)


def test_two_methods_are_fitted_separately():
    other = {"E": 2.0, "A": 250.0, "alpha": 0.3, "B": 600.0, "beta": 0.3}
    table = pd.concat([synthetic(noise=0.0), synthetic(other, noise=0.0, method="lowrank")])
    fits = fit_table(table, FitSettings(bootstrap=0, grid=COARSE))
    assert fits["lowrank"].law.alpha == pytest.approx(0.3, rel=1e-3)
    assert fits["m"].law.alpha == pytest.approx(0.34, rel=1e-3)
    assert fits["lowrank"].as_json(0.95)["ci"]["alpha"] == [None, None]  # no bootstrap, no interval


def test_the_best_of_all_starts_is_kept():
    """From (a, b, e, α, β) = (15, 5, −0.5, 1.5, 1.5) L-BFGS ends in a poor local minimum; a grid
    that starts there first and last must still return the global one."""
    table = synthetic(noise=0.0)
    n, d, loss = (table[c].to_numpy() for c in ("params", "tokens", "loss"))
    bad_start = np.array([[15.0, 5.0, -0.5, 1.5, 1.5]])
    stuck = fit_law(n, d, loss, FitSettings(), starts=bad_start)
    grid = {"a": [15, 5, 15], "b": [5], "e": [-0.5, 0, -0.5], "alpha": [1.5], "beta": [1.5, 0.5, 1.5]}
    starts = FitSettings(grid=grid).starts()
    assert starts[0].tolist() == starts[-1].tolist() == bad_start[0].tolist()
    best = fit_law(n, d, loss, FitSettings(grid=grid))
    assert stuck.objective > 1e3 * best.objective
    for name, true in TRUTH.items():
        assert getattr(best, name) == pytest.approx(true, rel=1e-3)


def test_an_irreducible_loss_driven_to_zero_still_bootstraps():
    """Runs far above the irreducible loss push e = log E towards −∞; E underflows to 0 and the
    bootstrap must restart from the fitted coordinates, not from log(E)."""
    table = synthetic({"E": 0.0, "A": 400.0, "alpha": 0.34, "B": 410.0, "beta": 0.28}, noise=0.003)
    n, d, loss = (table[c].to_numpy() for c in ("params", "tokens", "loss"))
    point = _as_fit(np.array([6.0, 6.0, -1000.0, 0.34, 0.28]), 0.0, True)
    assert point.E == 0.0
    samples, skipped = bootstrap_fits(n, d, loss, point, FitSettings(bootstrap=5))
    assert samples.shape == (5, 5) and skipped == 0
    assert np.isfinite(samples[:, 1:]).all() and (samples[:, 0] >= 0).all()


def test_unbounded_coordinates_become_infinite_not_errors():
    fit = _as_fit(np.array([800.0, 1.0, -900.0, 1.0, 1.0]), 0.0, True)
    assert (fit.A, fit.E) == (float("inf"), 0.0)


@pytest.mark.parametrize("sizes,budgets,message", [
    ([1e7], np.logspace(8, 11, 5), r"1 model size \(1e\+07\) cannot identify .* >= 3 model sizes"),
    ([1e7, 1e8], np.logspace(8, 11, 5), r"2 model sizes .* cannot identify"),
    (np.logspace(6, 9, 5), [1e9], r"1 token budget \(1e\+09\) cannot identify .* >= 3 token budgets"),
])
def test_data_that_cannot_identify_the_law_is_refused(sizes, budgets, message):
    with pytest.raises(ScalingFitError, match="method m: " + message):
        fit_table(synthetic(sizes=np.asarray(sizes), budgets=np.asarray(budgets)), FitSettings(bootstrap=0, grid=COARSE))


def test_too_few_runs_are_refused():
    table = synthetic(sizes=np.array([1e6, 1e7, 1e8]), budgets=np.array([1e8, 1e9, 1e10])).iloc[[0, 4, 8, 1, 5]]
    with pytest.raises(ScalingFitError, match="5 runs cannot fit 5 parameters"):
        fit_table(table, FitSettings(bootstrap=0, grid=COARSE))


def test_one_bad_method_refuses_before_any_fit():
    table = pd.concat([synthetic(), synthetic(sizes=np.array([1e7]), method="spectron")])
    with pytest.raises(ScalingFitError, match="method spectron: 1 model size"):
        fit_table(table, FitSettings(bootstrap=0, grid=COARSE))


def test_objective_gradient_matches_finite_differences():
    table = synthetic()
    data = tuple(np.log(table[c].to_numpy()) for c in ("params", "tokens", "loss"))
    for theta in (np.array([6.0, 6.0, 0.6, 0.35, 0.3]), np.array([0.0, 25.0, -1.0, 2.0, 0.5])):
        for delta in (1e-3, 10.0):  # the linear and the quadratic branch of the Huber loss
            step = 1e-6 * np.eye(5)
            numeric = [(huber_objective(theta + h, *data, delta)[0] - huber_objective(theta - h, *data, delta)[0]) / 2e-6
                       for h in step]
            analytic = huber_objective(theta, *data, delta)[1]
            assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-6 * np.abs(analytic).max())


def test_default_grid_is_hoffmanns():
    starts = FitSettings().starts()
    assert starts.shape == (4500, 5)
    assert HOFFMANN_GRID["alpha"] == (0.0, 0.5, 1.0, 1.5, 2.0) and HOFFMANN_GRID["a"][-1] == 25.0
    assert FitSettings().huber_delta == 1e-3


@pytest.mark.parametrize("drop", ["method", "params", "tokens", "loss"])
def test_a_missing_column_is_named(drop):
    with pytest.raises(ScalingFitError, match=f"lacks the column {drop}; a scaling table needs method, params, tokens, loss"):
        validate_table(synthetic().drop(columns=drop))


def test_bad_values_name_their_row_and_extra_columns_are_kept():
    table = synthetic().assign(flops_per_token=1.0, notes="x")
    assert list(validate_table(table).columns) == ["method", "params", "tokens", "loss", "flops_per_token", "notes"]
    table.loc[3, "loss"] = -1.0
    with pytest.raises(ScalingFitError, match="row 5 has loss = -1; loss must be a positive number"):
        validate_table(table)
    table["loss"] = table["loss"].astype(object)
    table.loc[3, "loss"] = "n/a"
    with pytest.raises(ScalingFitError, match="row 5 has loss = 'n/a'"):
        validate_table(table)
