"""Compute-optimal allocation: the closed form against a numerical minimisation along C = F(N)·D,
Chinchilla's special case, and FLOPs-per-token models fitted to measured counts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize_scalar

from rankscope.scaling.optimal import FlopsModel, flops_model, frontier, loss, optimal_exponents, optimal_params

LAW = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}


@pytest.mark.parametrize("k,gamma", [(6.0, 1.0), (3.5, 0.93), (11.0, 1.08)])
@pytest.mark.parametrize("compute", [1e18, 1e21, 1e24])
def test_closed_form_optimum_minimises_the_law_along_the_budget(k, gamma, compute):
    flops = FlopsModel(k, gamma, "test")

    def along_budget(log_n: float) -> float:
        n = math.exp(log_n)
        return float(loss(LAW, n, compute / flops(n)))

    numeric = math.exp(minimize_scalar(along_budget, bounds=(math.log(1e3), math.log(1e14)), method="bounded",
                                       options={"xatol": 1e-10}).x)
    assert float(optimal_params(LAW, flops, compute)) == pytest.approx(numeric, rel=1e-4)


def test_chinchilla_special_case():
    """F = 6N: N* = G·(C/6)^(β/(α+β)) with G = (αA/(βB))^(1/(α+β)) (Hoffmann et al. 2022, eq. 4)."""
    a, b = optimal_exponents(LAW["alpha"], LAW["beta"], 1.0)
    assert a == pytest.approx(0.28 / 0.62) and a + b == pytest.approx(1.0)
    G = (LAW["alpha"] * LAW["A"] / (LAW["beta"] * LAW["B"])) ** (1 / 0.62)
    assert float(optimal_params(LAW, FlopsModel(6.0, 1.0, "6N"), 1e21)) == pytest.approx(G * (1e21 / 6) ** a, rel=1e-12)
    front = frontier(LAW, FlopsModel(6.0, 1.0, "6N"), FlopsModel(2.0, 1.0, "2N"), [1e21, 1e23])
    assert (6 * front["params"] * front["tokens"]).tolist() == pytest.approx([1e21, 1e23])
    assert front["inference_flops_per_token"].tolist() == pytest.approx((2 * front["params"]).tolist())
    # A cheaper-per-token method (γ < 1) spends the same compute on more data.
    assert optimal_exponents(0.34, 0.28, 0.9)[1] > b


def test_flops_model_is_fitted_to_measured_counts_or_falls_back_to_dense():
    params = np.array([2e4, 8e4, 3e5, 1e6])
    rows = pd.DataFrame({"params": np.repeat(params, 2), "flops_per_token": np.repeat(4.2 * params**0.9, 2)})
    fitted = flops_model(rows, "flops_per_token", 6.0)
    assert (fitted.k, fitted.gamma, fitted.source) == (pytest.approx(4.2), pytest.approx(0.9), "measured")
    assert fitted.max_rel_error < 1e-9
    dense = flops_model(rows.drop(columns="flops_per_token"), "flops_per_token", 6.0)
    assert (dense.k, dense.gamma) == (6.0, 1.0) and "dense approximation" in dense.source
