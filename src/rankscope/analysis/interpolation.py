"""Linear interpolation between parameter sets and its barrier height (METRICS.md §2).

``losses`` are ``L(α)`` for α evenly spaced over [0, 1] (default 21 points), endpoints included.
Barrier functions take array-likes, compute in fp64 and are vectorised over leading dimensions
(one path gives a float, a batch of paths ``(..., n_alphas)`` a tensor).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from rankscope.errors import AnalysisError

DEFAULT_INTERPOLATION_POINTS = 21


def interpolation_alphas(n_points: int = DEFAULT_INTERPOLATION_POINTS) -> torch.Tensor:
    """α = linspace(0, 1, n_points) in fp64 (exactly 0 and 1 at the ends)."""
    if not isinstance(n_points, int) or n_points < 3:
        raise AnalysisError(f"an interpolation path needs at least 3 points (an interior one), got {n_points!r}")
    return torch.linspace(0.0, 1.0, n_points, dtype=torch.float64)


def _path(losses: Sequence[float] | torch.Tensor) -> torch.Tensor:
    path = torch.as_tensor(losses).detach().to(torch.float64)
    if path.ndim == 0 or path.shape[-1] < 3:
        raise AnalysisError(
            f"losses must hold L(α) at >= 3 evenly spaced α in [0, 1] (endpoints included), got shape {tuple(path.shape)}"
        )
    return path


def _endpoint_mean(path: torch.Tensor) -> torch.Tensor:
    return 0.5 * (path[..., 0] + path[..., -1])


def _as_output(value: torch.Tensor) -> float | torch.Tensor:
    return value.item() if value.ndim == 0 else value


def barrier(losses: Sequence[float] | torch.Tensor) -> float | torch.Tensor:
    """``B = max_{0<α<1} L(α) − ½[L(0) + L(1)]`` (negative when every interior point is below the ends)."""
    path = _path(losses)
    return _as_output(path[..., 1:-1].amax(-1) - _endpoint_mean(path))


def relative_barrier(losses: Sequence[float] | torch.Tensor) -> float | torch.Tensor:
    """``B / ½[L(0) + L(1)]``."""
    path = _path(losses)
    return _as_output((path[..., 1:-1].amax(-1) - _endpoint_mean(path)) / _endpoint_mean(path))


def interpolate(
    theta_a: Mapping[str, torch.Tensor],
    theta_b: Mapping[str, torch.Tensor],
    alpha: float,
    *,
    out_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """``(1 − α)·θ_a + α·θ_b`` for every tensor, computed in fp32 from the two endpoints.

    Each point is computed afresh from θ_a and θ_b (never by stepping from the previous point),
    so there is no drift, and α = 0 / α = 1 return θ_a / θ_b exactly. The result is fp32 unless
    ``out_dtype`` asks for another dtype. Non-floating tensors (integer buffers) must be equal in
    both sets and are copied.
    """
    if set(theta_a) != set(theta_b):
        only_a = sorted(set(theta_a) - set(theta_b))[:3]
        only_b = sorted(set(theta_b) - set(theta_a))[:3]
        raise AnalysisError(
            f"the parameter sets differ (only in a: {only_a}, only in b: {only_b}); interpolate matching spaces"
        )
    alpha = float(alpha)
    result: dict[str, torch.Tensor] = {}
    for name, a in theta_a.items():
        b = theta_b[name]
        if a.shape != b.shape:
            raise AnalysisError(f"{name!r} has shape {tuple(a.shape)} in a but {tuple(b.shape)} in b")
        if not a.is_floating_point():
            if not torch.equal(a, b.to(a.device)):
                raise AnalysisError(f"non-floating tensor {name!r} differs between the endpoints; it cannot be interpolated")
            result[name] = a.detach().clone()
            continue
        a32 = a.detach().to(torch.float32)
        b32 = b.detach().to(device=a32.device, dtype=torch.float32)
        mixed = (1.0 - alpha) * a32 + alpha * b32
        result[name] = mixed if out_dtype is None else mixed.to(out_dtype)
    return result
