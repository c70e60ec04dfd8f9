"""Realistic LLM-like gradients with spikes, for the SPAM-family oracle tests."""

from __future__ import annotations

import torch


def spiky_gradients(shapes, seed: int, spike_rate: float = 0.05, spike: float = 1e3) -> list[torch.Tensor]:
    """Per tensor a scale between 1e-5 and 1e-2 (log-uniform), Gaussian entries, and a fraction
    `spike_rate` of entries `spike` times larger."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        scale = 10.0 ** (-5.0 + 3.0 * torch.rand((), generator=g).item())
        grad = scale * torch.randn(*shape, generator=g)
        spikes = torch.rand(shape, generator=g) < spike_rate
        out.append(torch.where(spikes, grad * spike, grad))
    return out
