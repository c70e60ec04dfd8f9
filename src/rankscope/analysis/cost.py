"""What one landscape or interpolation point costs, against one plain forward over the probe set
(`benchmarks/analysis_speed.py` and `rankscope bench analysis`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rankscope.analysis import interpolation as interp
from rankscope.analysis import landscape as land
from rankscope.analysis.probe import Probe, sync
from rankscope.analysis.space import ParameterSpace


def measure_point_cost(
    model: nn.Module,
    probe: Probe | torch.Tensor,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Seconds per plain forward over the probe set, per landscape point and per interpolation
    point (each the median of ``repeats`` after a warm-up), their ratios, and the time of the
    parameter writes alone (``landscape_write_s``, ``interpolation_write_s``).

    A landscape point writes θ + α·d from the master and evaluates the probe loss; an
    interpolation point forms (1−α)θ_a + αθ_b afresh and does the same. The model is restored.
    """
    if isinstance(probe, torch.Tensor):
        device = torch.device(device) if device is not None else next(model.parameters()).device
        probe = Probe(probe, batch_size, device)
    device = probe.device
    model.eval()
    space = ParameterSpace(model)
    direction = land.random_direction(space.shapes(), 0, seed, device=device)
    far = {n: space.master[n] + 0.01 * direction[n] for n in space.names}

    def timed(fn: Callable[[], Any]) -> float:
        fn()  # warm-up
        times = []
        for _ in range(max(1, repeats)):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def landscape_point() -> float:
        space.set_point(0.001, direction)
        return probe.loss(model)

    def interpolation_point() -> float:
        space.set_values(interp.interpolate(space.master, far, 0.35))
        return probe.loss(model)

    try:
        forward = timed(lambda: probe.loss(model))
        landscape = timed(landscape_point)
        interpolation = timed(interpolation_point)
        # The writes alone: less noisy than the difference of two forward timings.
        write_direction = timed(lambda: space.set_point(0.001, direction))
        write_interpolated = timed(lambda: space.set_values(interp.interpolate(space.master, far, 0.35)))
    finally:
        space.restore()
    return {
        "device": str(device),
        "parameters": sum(t.numel() for t in space.master.values()),
        "probe_sequences": len(probe),
        "probe_tokens": probe.tokens,
        "batch_size": probe.batch_size,
        "forward_s": forward,
        "landscape_point_s": landscape,
        "interpolation_point_s": interpolation,
        "landscape_ratio": landscape / forward,
        "interpolation_ratio": interpolation / forward,
        "landscape_write_s": write_direction,
        "interpolation_write_s": write_interpolated,
    }
