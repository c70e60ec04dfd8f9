"""Sharpness from the Hessian of the loss, through Hessian-vector products (HVPs) only: the top
eigenvalue by power iteration and the trace by Hutchinson's estimator.

The study's launcher (low-rank-geometry, loss-landscape/scripts/bash_scripts/8_hessian_multi_chkpt.sh)
reports top Hessian eigenvalues per checkpoint; the Python script it calls is not part of the
repository snapshot, so these estimators follow the usual PyHessian conventions (Yao et al. 2020):
power iteration stops when the relative change of the Rayleigh quotient is below a tolerance,
and the trace is the mean of vᵀHv over Rademacher vectors v.

Vectors are lists of tensors shaped like the parameters. An ``hvp`` is any callable mapping such a
list v to H·v (:func:`probe_hvp` builds the one of a model's loss on a probe set); everything
here is exact given exact HVPs: a quadratic L(θ) = ½ θᵀHθ has H·v = H v.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from rankscope.analysis import AnalysisError

Vector = list[torch.Tensor]
HVP = Callable[[Vector], Vector]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def _seeded(like: Sequence[torch.Tensor], seed: int, stream: str, draw: Callable[[torch.Size, torch.Generator], torch.Tensor]) -> Vector:
    """One tensor per parameter from a CPU generator seeded by (seed, stream, index), so a vector
    does not depend on the device or on how many were drawn before."""
    out = []
    for index, tensor in enumerate(like):
        digest = hashlib.blake2b(f"rankscope/hessian/{seed}/{stream}/{index}".encode(), digest_size=8).digest()
        generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little"))
        out.append(draw(tensor.shape, generator).to(device=tensor.device, dtype=torch.float32))
    return out


def rademacher(like: Sequence[torch.Tensor], seed: int, index: int) -> Vector:
    """Entries ±1 with equal probability."""
    return _seeded(like, seed, f"rademacher/{index}",
                   lambda shape, g: torch.randint(0, 2, shape, generator=g).to(torch.float32) * 2 - 1)


class Eigenvalue(NamedTuple):
    value: float  # the Rayleigh quotient vᵀHv at the last iterate (‖v‖ = 1)
    iterations: int  # HVPs used
    converged: bool  # relative change below the tolerance before the budget ran out


def top_eigenvalue(hvp: HVP, like: Sequence[torch.Tensor], iterations: int = 20, tolerance: float = 1e-3, seed: int = 0) -> Eigenvalue:
    """The eigenvalue of largest magnitude of H by power iteration from a seeded Gaussian start.

    Stops when ``|λ_i − λ_{i−1}| / (|λ_{i−1}| + 1e-6) < tolerance`` (PyHessian's rule) or after
    ``iterations`` HVPs.
    """
    if iterations < 1 or not tolerance > 0:
        raise AnalysisError(f"power iteration needs iterations >= 1 and tolerance > 0, got {iterations}, {tolerance}")
    v = _seeded(like, seed, "power", lambda shape, g: torch.randn(shape, generator=g))
    norm = torch.sqrt(_dot(v, v))
    v = [t / norm.to(t.dtype) for t in v]
    previous = None
    for step in range(1, iterations + 1):
        w = hvp(v)
        value = float(_dot(v, w))
        if previous is not None and abs(value - previous) / (abs(previous) + 1e-6) < tolerance:
            return Eigenvalue(value, step, True)
        previous = value
        norm = torch.sqrt(_dot(w, w))
        if norm == 0:  # H v = 0: v lies in the null space; the Hessian (restricted here) is zero
            return Eigenvalue(0.0, step, True)
        v = [t / norm.to(t.dtype) for t in w]
    return Eigenvalue(previous, iterations, False)


class Trace(NamedTuple):
    value: float  # mean of vᵀHv over the samples
    standard_error: float  # sample std / sqrt(samples) (nan for one sample)
    samples: int


def hutchinson_trace(hvp: HVP, like: Sequence[torch.Tensor], samples: int = 10, seed: int = 0) -> Trace:
    """tr(H) ≈ mean_i v_iᵀ H v_i over Rademacher vectors v_i (unbiased; exact for a diagonal H)."""
    if samples < 1:
        raise AnalysisError(f"Hutchinson's estimator needs samples >= 1, got {samples}")
    values = []
    for index in range(samples):
        v = rademacher(like, seed, index)
        values.append(float(_dot(v, hvp(v))))
    estimates = torch.tensor(values, dtype=torch.float64)
    error = float(estimates.std(correction=1) / samples**0.5) if samples > 1 else float("nan")
    return Trace(float(estimates.mean()), error, samples)


@contextlib.contextmanager
def _differentiable(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Every parameter requires grad (frozen ones too: the Hessian is over the native parameters),
    and attention runs its math kernel (fused ones have no double backward)."""
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def probe_hvp(model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor], weights: Sequence[float],
              loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> tuple[HVP, Vector]:
    """The HVP of L(θ) = Σ_b weights[b]·loss(model, batch_b) with respect to the named parameters
    (double backward, batch by batch), and the parameters themselves (for shapes)."""
    named = dict(model.named_parameters())
    missing = [n for n in names if n not in named]
    if missing:
        raise AnalysisError(f"the model has no parameters {missing[:3]}")
    params = [named[n] for n in names]

    def hvp(vector: Vector) -> Vector:
        out = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        with _differentiable(params):
            for batch, weight in zip(batches, weights):
                grads = torch.autograd.grad(loss(model, batch), params, create_graph=True)
                dot = sum((g * v.to(g.dtype)).sum() for g, v in zip(grads, vector))
                for acc, hv in zip(out, torch.autograd.grad(dot, params)):
                    acc.add_(hv.float(), alpha=weight)
        return out

    return hvp, [p.detach() for p in params]
