"""A probe stand-in whose loss is a known quadratic of the model's parameters (imported by the stage
tests; not a conftest, so the suite's root conftest stays the one `from conftest import` finds)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class QuadraticProbe:
    """L(θ) = ½ θᵀHθ + gᵀθ over the model's flattened parameters (in `parameters()` order), in fp64."""

    device = torch.device("cpu")

    def __init__(self, hessian: torch.Tensor, gradient: torch.Tensor) -> None:
        self.hessian, self.gradient = hessian, gradient

    def loss(self, model: nn.Module) -> float:
        theta = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
        return float(0.5 * theta @ self.hessian @ theta + self.gradient @ theta)


@pytest.fixture
def quadratic():
    """(model, probe): an nn.Linear(3, 2) at random weights and a random SPD quadratic loss."""
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    a = torch.randn(8, 8, generator=g, dtype=torch.float64)
    hessian = a @ a.T / 8 + 0.1 * torch.eye(8, dtype=torch.float64)
    return model, QuadraticProbe(hessian, torch.randn(8, generator=g, dtype=torch.float64))
