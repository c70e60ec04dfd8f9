"""Sharpness from the Hessian of the loss, through Hessian-vector products (HVPs) only: its
largest and smallest algebraic eigenvalues by the Lanczos method and its trace by Hutchinson's
estimator, each with the evidence that decides whether it can be read (converged or not, and why).

The study's launcher (low-rank-geometry, loss-landscape/scripts/bash_scripts/8_hessian_multi_chkpt.sh)
reports top Hessian eigenvalues per checkpoint (and a `--compute_min_eigenvalue` flag); the
Python script it calls is not part of the repository snapshot. PyHessian (Yao et al. 2020), the
usual tool, uses power iteration, which finds the eigenvalue of largest magnitude, whatever its
sign; we report the two algebraic extremes instead, so that negative curvature is never read as
sharpness. The trace is the mean of vᵀHv over Rademacher vectors v, as in PyHessian.

Vectors are lists of tensors shaped like the parameters. An ``hvp`` is any callable mapping such a
list v to H·v (:func:`probe_hvp` builds the one of a model's loss on a probe set); everything
here is exact given exact HVPs: a quadratic L(θ) = ½ θᵀHθ has H·v = H v.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from rankscope.errors import AnalysisError

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
    value: float  # the Ritz value: an eigenvalue of H restricted to the Krylov space
    hvps: int  # HVPs after which this estimate met the tolerance (the budget when it did not)
    converged: bool  # relative residual <= tolerance within the budget
    residual: float  # ‖H y − θ y‖ / |θ| for the Ritz pair (θ, y), ‖y‖ = 1
    reason: str  # why it did not converge; "" when it did


class Extremes(NamedTuple):
    largest: Eigenvalue  # the largest algebraic eigenvalue λ_max
    smallest: Eigenvalue  # the smallest algebraic (most negative) eigenvalue λ_min


def _flat(vector: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in vector])


def _unflat(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> Vector:
    out, start = [], 0
    for tensor in like:
        out.append(flat[start:start + tensor.numel()].reshape(tensor.shape))
        start += tensor.numel()
    return out


def extreme_eigenvalues(hvp: HVP, like: Sequence[torch.Tensor], iterations: int = 100, tolerance: float = 1e-2,
                        seed: int = 0) -> Extremes:
    """The largest and the smallest algebraic eigenvalue of H by the Lanczos method with full
    reorthogonalization, from a seeded Gaussian start; both come from the same Krylov space.

    Why not power iteration: it finds the eigenvalue of largest *magnitude* (a negative one when
    the negative curvature dominates, with no way to tell from its value alone) and converges
    slowly when the top two are close. Why not scipy's ``eigsh`` (ARPACK): its budget counts
    restarts, not HVPs, and on ``ArpackNoConvergence`` it keeps only the converged eigenvalues, so an
    estimate that ran out of budget has no value at all; here it keeps its Ritz value, marked.

    After m HVPs the Lanczos vectors Q_m span the Krylov space {v, Hv, …, H^{m−1} v} and
    T_m = Q_mᵀ H Q_m is tridiagonal; a Ritz pair (θ, s) of T_m gives y = Q_m s with residual
    ‖H y − θ y‖ = β_m |s_m|, known without another HVP. An estimate converges at the first m where
    that residual is <= ``tolerance``·|θ|; H then has an eigenvalue within ``tolerance``·|θ| of θ (for
    a symmetric matrix some eigenvalue lies within the residual of any Ritz value). Until then the
    largest Ritz value is a lower bound of λ_max and the smallest an upper bound of λ_min (Cauchy
    interlacing), and it moves monotonically towards them. Stops when both converged or after
    ``iterations`` HVPs. Memory: the Lanczos vectors, up to ``iterations`` × parameters × 8 bytes.
    """
    if iterations < 1 or not tolerance > 0:
        raise AnalysisError(f"Lanczos needs iterations >= 1 and tolerance > 0, got {iterations}, {tolerance}")
    from scipy.linalg import eigh_tridiagonal

    q = _flat(_seeded(like, seed, "lanczos", lambda shape, g: torch.randn(shape, generator=g)))
    n = q.numel()
    q /= torch.linalg.vector_norm(q)
    basis = torch.empty(min(32, iterations, n), n, dtype=torch.float64, device=q.device)  # grown as needed
    alphas: list[float] = []
    betas: list[float] = []
    found: dict[str, Eigenvalue] = {}
    theta = residuals = None
    steps = min(iterations, n)  # a Krylov space of dimension n is all of it: the Ritz values are exact
    for m in range(1, steps + 1):
        if m > basis.shape[0]:
            basis = torch.cat([basis, torch.empty_like(basis[: min(basis.shape[0], steps - basis.shape[0])])])
        basis[m - 1] = q
        w = _flat(hvp(_unflat(q, like)))
        alphas.append(float(w @ q))
        # Full reorthogonalization, twice ("twice is enough", Parlett): without it the Lanczos
        # vectors lose orthogonality as Ritz values converge and T_m grows spurious copies of them.
        for _ in range(2):
            w -= basis[:m].T @ (basis[:m] @ w)
        beta = float(torch.linalg.vector_norm(w))
        theta, vectors = eigh_tridiagonal(alphas, betas) if m > 1 else ([alphas[0]], [[1.0]])
        residuals = [beta * abs(float(vectors[-1][i])) for i in range(m)]  # ‖H y_i − θ_i y_i‖
        scale = max(abs(float(t)) for t in theta)
        # The Krylov space is invariant (β ≈ 0): its Ritz values are exact eigenvalues of H.
        invariant = beta <= 1e-12 * scale or m == n
        for key, index in (("largest", m - 1), ("smallest", 0)):
            value, residual = float(theta[index]), residuals[index]
            if key not in found and (invariant or residual <= tolerance * abs(value)):
                found[key] = Eigenvalue(value, m, True, 0.0 if invariant else _relative(residual, value), "")
        if len(found) == 2 or invariant:
            break
        betas.append(beta)
        q = w / beta
    for key, index in (("largest", -1), ("smallest", 0)):
        if key not in found:
            relative = _relative(residuals[index], float(theta[index]))
            found[key] = Eigenvalue(float(theta[index]), len(alphas), False, relative,
                                    f"Lanczos did not converge in {len(alphas)} HVPs (relative residual {relative:.2g} > "
                                    f"tolerance {tolerance:g}) — raise hessian_iterations")
    return Extremes(found["largest"], found["smallest"])


def _relative(residual: float, value: float) -> float:
    return residual / abs(value) if value != 0 else (0.0 if residual == 0 else float("inf"))


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


def trace_unreadable(trace: Trace, max_relative_se: float) -> str:
    """Why a Hutchinson estimate cannot be read ("" when it can): its standard error must be
    known (two samples or more) and at most ``max_relative_se``·|value|. Two traces with 10 %
    standard errors are two standard errors apart only when they differ by about 30 %, so a
    looser one cannot order the methods of a study (the demo's traces differ by factors of 2-4,
    its seeds by ~10 %)."""
    if math.isnan(trace.standard_error):  # one sample
        return f"Hutchinson trace from {trace.samples} sample has no standard error — set hessian_samples >= 2"
    if trace.standard_error <= max_relative_se * abs(trace.value):
        return ""
    relative = trace.standard_error / abs(trace.value) if trace.value else float("inf")
    return (f"Hutchinson standard error {trace.standard_error:.3g} is {relative:.1%} of |trace| {abs(trace.value):.3g} "
            f"after {trace.samples} samples (> {max_relative_se * 100:g}% allowed) — raise hessian_samples")


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
