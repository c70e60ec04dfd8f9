"""The landscape stage on a known quadratic: the study's singular grid (26 points, no 0, centre
index 13) and top-K aggregation give expected sharpness in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from quadratic_probe import quadratic  # noqa: F401 - the fixture

from rankscope.analysis import landscape as land
from rankscope.analysis.settings import AnalysisSettings
from rankscope.analysis.stages.landscape import landscape_family, singular_grid


def test_default_singular_grid_is_the_studys():
    alphas, center = singular_grid(AnalysisSettings())
    assert alphas.numel() == 26 and center == 13 and not (alphas == 0).any()
    centred, none = singular_grid(AnalysisSettings(singular_grid="centered", grid_points=25))
    assert none is None and centred.numel() == 25 and centred[12] == 0


def test_singular_sharpness_on_the_study_grid_of_a_quadratic(quadratic):  # noqa: F811 - the fixture, by name
    model, probe = quadratic
    settings = AnalysisSettings(directions=2, singular_k_max=3, singular_ks=(1, 3), singular_unweighted=False)
    rows, profiles = landscape_family(model, probe, settings)
    assert profiles["singular"].shape == (3, 26)  # every point evaluated: the grid has no α = 0
    # On a quadratic, ½(L(α_c + hm) + L(α_c − hm)) − L(α_c) = ½ dᵀHd (hm)², whatever the centre
    # and the gradient: ES_K = ½ h² mean_{m≤12}(m²) · mean_{k≤K} d_kᵀ H d_k.
    weight = model.weight.detach()
    directions = [torch.cat([d["weight"].double().reshape(-1), torch.zeros(2, dtype=torch.float64)])
                  for d in land.singular_directions({"weight": weight}, k_max=3)]
    curvature = [float(d @ probe.hessian @ d) for d in directions]
    h = 0.004
    factor = 0.5 * h**2 * np.mean(np.arange(1, 13) ** 2)
    es = {r["k_max"]: r["value"] for r in rows if r["direction_set"] == "singular" and r["metric"] == "expected_sharpness"}
    assert es[1] == pytest.approx(factor * curvature[0], rel=1e-4)
    # A 2 × 3 weight has two components: k = 3 clamps to the second, as the study's code does.
    assert es[3] == pytest.approx(factor * np.mean([curvature[0], curvature[1], curvature[1]]), rel=1e-4)
