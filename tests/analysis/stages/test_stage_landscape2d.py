"""The 2-D landscape of a known quadratic: every grid point and every summary in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from quadratic_probe import quadratic  # noqa: F401 - the fixture

from rankscope.analysis import landscape as land
from rankscope.analysis.space import ParameterSpace
from rankscope.analysis.stages.landscape2d import evaluate_surface, surface_summary


def test_surface_of_a_quadratic_matches_its_closed_form(quadratic):  # noqa: F811 - the fixture, by name
    model, probe = quadratic  # 8 parameters: weight 2 × 3 and bias 2
    hessian, gradient = probe.hessian, probe.gradient
    g = torch.Generator().manual_seed(9)
    space = ParameterSpace(model)
    d1 = {"weight": torch.randn(2, 3, generator=g), "bias": torch.randn(2, generator=g)}
    d2 = {"weight": torch.randn(2, 3, generator=g)}  # a direction may leave a tensor alone
    xs, ys = land.make_grid(5, 0.05), land.make_grid(7, 0.03)

    surface = evaluate_surface(space, probe, d1, d2, xs, ys)

    flat = lambda d: torch.cat([d.get("weight", torch.zeros(2, 3)).double().reshape(-1), d.get("bias", torch.zeros(2)).double()])  # noqa: E731
    v1, v2 = flat(d1), flat(d2)
    theta = torch.cat([model.weight.detach().double().reshape(-1), model.bias.detach().double()])
    slope = gradient + hessian @ theta
    h11, h12, h22 = float(v1 @ hessian @ v1), float(v1 @ hessian @ v2), float(v2 @ hessian @ v2)
    X, Y = np.meshgrid(xs.numpy(), ys.numpy())
    expected = X * float(slope @ v1) + Y * float(slope @ v2) + 0.5 * (X**2 * h11 + 2 * X * Y * h12 + Y**2 * h22)
    assert surface.values.shape == (7, 5) and surface.values[3, 2] == 0.0
    assert np.allclose(surface.values, expected, rtol=1e-5, atol=1e-6)  # θ is written in fp32
    assert surface.base_loss == pytest.approx(probe.loss(model))
    assert torch.equal(model.weight, space.master["weight"])  # restored bit for bit

    summary = surface_summary(surface)
    # ES along an axis sees only the curvature: ½ h·mean(α_m²) over the positive grid points.
    assert summary["expected_sharpness_x"] == pytest.approx(0.5 * h11 * np.mean(xs.numpy()[3:] ** 2), rel=1e-5)
    assert summary["expected_sharpness_y"] == pytest.approx(0.5 * h22 * np.mean(ys.numpy()[4:] ** 2), rel=1e-5)
    # The mean over the plane: the linear and cross terms cancel on a symmetric grid.
    mean_rise = 0.5 * (h11 * np.mean(xs.numpy() ** 2) + h22 * np.mean(ys.numpy() ** 2))
    assert summary["mean_rise"] == pytest.approx(mean_rise, rel=1e-4)
    assert summary["center_to_min"] == pytest.approx(-expected.min(), rel=1e-5)
