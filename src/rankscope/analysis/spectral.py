"""Spectral structure of weight matrices and of their updates (METRICS.md §3).

Every metric has two forms: ``metric(W)`` takes a matrix (or a batch ``(k, m, n)`` of matrices
of one shape) and computes its singular values; ``metric_from_sv(sv)`` takes singular values
already computed, so a pipeline runs one SVD per matrix and derives every number from it.

Singular values at or below ``SV_TOLERANCE`` count as absent (numerically zero). For a single
matrix :func:`singular_values` drops them; for a batch, whose rows would otherwise be ragged, it
sets them to 0, and every ``*_from_sv`` helper ignores entries ``<= SV_TOLERANCE``, so both forms
give the same numbers.

Return types: a single matrix (1-D ``sv``) gives Python numbers; a batch gives a tensor of
shape ``(k,)``.

Degenerate inputs (a zero matrix, e.g. the frozen base of ReLoRA between merges, whose ΔW is 0):
every metric is 0, as the study's ``_metrics_from_singular_values`` reports it
(low-rank-geometry, loss-landscape/scripts/single_checkpoint_scripts/5_ranks.py). The spectral
gap and σ₂/σ₁ are undefined there; ``undefined=float("nan")`` gives ``nan`` instead (our variant).
"""

from __future__ import annotations

import math

import torch

from rankscope.errors import AnalysisError

SV_TOLERANCE = 1e-12
DEFAULT_THRESHOLD = 0.1
DEFAULT_RANK_TOL = 1e-12  # the study's `--rank_tol` default (None -> eps = 1e-12)

NumberOrTensor = float | int | torch.Tensor


def _as_output(value: torch.Tensor) -> NumberOrTensor:
    """0-d results become Python numbers; batched results stay tensors."""
    return value.item() if value.ndim == 0 else value


def _check_matrix(W: torch.Tensor) -> None:
    if not isinstance(W, torch.Tensor):
        raise AnalysisError(f"expected a torch.Tensor, got {type(W).__name__}; convert with torch.as_tensor")
    if W.ndim not in (2, 3):
        raise AnalysisError(
            f"expected a matrix (m, n) or a batch (k, m, n), got shape {tuple(W.shape)}; "
            "reshape the parameter to 2-D first"
        )


def _check_sv(sv: torch.Tensor) -> torch.Tensor:
    sv = torch.as_tensor(sv)
    if sv.ndim not in (1, 2):
        raise AnalysisError(
            f"expected singular values of shape (r,) or (k, r), got {tuple(sv.shape)}; "
            "pass the output of singular_values()"
        )
    if not sv.is_floating_point():
        sv = sv.to(torch.float64)
    return sv


def _kept(sv: torch.Tensor) -> torch.Tensor:
    """Singular values with the numerically-zero ones set to exactly 0 (same shape)."""
    return torch.where(sv > SV_TOLERANCE, sv, torch.zeros((), dtype=sv.dtype, device=sv.device))


def singular_values(W: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Singular values in descending order, computed in ``dtype`` (fp64 by default).

    A matrix ``(m, n)`` gives the values ``> SV_TOLERANCE`` (1-D, possibly shorter than
    ``min(m, n)``). A batch ``(k, m, n)`` gives ``(k, min(m, n))`` with the dropped values set to 0.
    """
    _check_matrix(W)
    sv = torch.linalg.svdvals(W.detach().to(dtype))
    if W.ndim == 2:
        return sv[sv > SV_TOLERANCE]
    return _kept(sv)


# --- metrics from singular values -------------------------------------------------------------


def effective_rank_from_sv(sv: torch.Tensor) -> NumberOrTensor:
    """``exp(-Σ p_i log p_i)`` with ``p_i = σ_i / Σσ`` (Roy & Vetterli 2007); 0 for a zero matrix."""
    s = _kept(_check_sv(sv))
    total = s.sum(-1, keepdim=True)
    p = s / torch.where(total > 0, total, torch.ones_like(total))
    entropy = -torch.special.xlogy(p, p).sum(-1)  # xlogy gives 0·log 0 = 0 for dropped values
    erank = torch.where(total.squeeze(-1) > 0, torch.exp(entropy), torch.zeros_like(entropy))
    return _as_output(erank)


def stable_rank_from_sv(sv: torch.Tensor) -> NumberOrTensor:
    """``Σσ_i² / σ_1²``; 0 for a zero matrix."""
    s = _kept(_check_sv(sv))
    top = s.amax(-1) if s.shape[-1] else s.sum(-1)
    energy = (s * s).sum(-1)
    safe_top = torch.where(top > 0, top, torch.ones_like(top))
    return _as_output(torch.where(top > 0, energy / (safe_top * safe_top), torch.zeros_like(energy)))


def _top_two(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Pad with two zeros so that top-2 exists for any length; the values need not come sorted.
    padded = torch.nn.functional.pad(s, (0, 2))
    top2 = torch.topk(padded, 2, dim=-1).values
    return top2[..., 0], top2[..., 1]


def spectral_gap_from_sv(sv: torch.Tensor, undefined: float = 0.0) -> NumberOrTensor:
    """``(σ_1 − σ_2) / σ_1`` (σ_2 = 0 for a rank-1 matrix, giving 1); ``undefined`` for a zero
    matrix (0 as the study reports it, or ``nan``)."""
    s = _kept(_check_sv(sv))
    sigma1, sigma2 = _top_two(s)
    safe = torch.where(sigma1 > 0, sigma1, torch.ones_like(sigma1))
    return _as_output(torch.where(sigma1 > 0, (sigma1 - sigma2) / safe, torch.full_like(sigma1, undefined)))


def sv_ratio_from_sv(sv: torch.Tensor, undefined: float = 0.0) -> NumberOrTensor:
    """``σ_2 / σ_1`` (the study's ``singular_value_ratio``); ``undefined`` for a zero matrix."""
    s = _kept(_check_sv(sv))
    sigma1, sigma2 = _top_two(s)
    safe = torch.where(sigma1 > 0, sigma1, torch.ones_like(sigma1))
    return _as_output(torch.where(sigma1 > 0, sigma2 / safe, torch.full_like(sigma1, undefined)))


def numerical_rank_from_sv(sv: torch.Tensor, tol: float = DEFAULT_RANK_TOL) -> NumberOrTensor:
    """``#{σ_i > tol}``: the study's ``rank`` (an absolute tolerance, 1e-12 by default)."""
    s = _check_sv(sv)
    return _as_output((s > tol).sum(-1))


def count_above_from_sv(sv: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> NumberOrTensor:
    """``#{σ_i > threshold}`` (an int for one matrix, an int64 tensor for a batch)."""
    s = _kept(_check_sv(sv))
    return _as_output((s > threshold).sum(-1))


def spectral_summary_from_sv(
    sv: torch.Tensor, min_dim: int, threshold: float = DEFAULT_THRESHOLD, *,
    rank_tol: float = DEFAULT_RANK_TOL, undefined: float = 0.0,
) -> dict[str, NumberOrTensor]:
    """Every spectral metric from precomputed singular values.

    ``min_dim`` is ``min(m, n)`` of the matrix (the values kept may be fewer), used for the
    normalized variants; ``undefined`` is the spectral gap and σ₂/σ₁ of a zero matrix.
    """
    if min_dim <= 0:
        raise AnalysisError(f"min_dim must be min(m, n) of the matrix (> 0), got {min_dim}")
    raw = _check_sv(sv)
    s = _kept(raw)
    erank = effective_rank_from_sv(s)
    count = count_above_from_sv(s, threshold)
    rank = numerical_rank_from_sv(raw, rank_tol)
    sigma_max = s.amax(-1) if s.shape[-1] else s.sum(-1)
    as_float = lambda n: n.to(torch.float64) if isinstance(n, torch.Tensor) else n  # noqa: E731
    return {
        "effective_rank": erank,
        "effective_rank_normalized": erank / min_dim,
        "stable_rank": stable_rank_from_sv(s),
        "spectral_gap": spectral_gap_from_sv(s, undefined),
        "sv_ratio": sv_ratio_from_sv(s, undefined),
        "count_above": count,
        "count_above_normalized": as_float(count) / min_dim,
        "numerical_rank": rank,
        "numerical_rank_normalized": as_float(rank) / min_dim,
        "sigma_max": _as_output(sigma_max),
        "frobenius_norm": _as_output(torch.sqrt((s * s).sum(-1))),
        "num_singular_values": _as_output((s > 0).sum(-1)),
    }


# --- metrics from matrices --------------------------------------------------------------------


def effective_rank(W: torch.Tensor) -> NumberOrTensor:
    """Effective rank of W (see :func:`effective_rank_from_sv`)."""
    return effective_rank_from_sv(singular_values(W))


def stable_rank(W: torch.Tensor) -> NumberOrTensor:
    """Stable rank of W (see :func:`stable_rank_from_sv`)."""
    return stable_rank_from_sv(singular_values(W))


def spectral_gap(W: torch.Tensor, undefined: float = 0.0) -> NumberOrTensor:
    """Spectral gap of W (see :func:`spectral_gap_from_sv`)."""
    return spectral_gap_from_sv(singular_values(W), undefined)


def numerical_rank(W: torch.Tensor, tol: float = DEFAULT_RANK_TOL) -> NumberOrTensor:
    """Number of singular values of W above ``tol`` (see :func:`numerical_rank_from_sv`)."""
    _check_matrix(W)
    return numerical_rank_from_sv(torch.linalg.svdvals(W.detach().to(torch.float64)), tol)


def count_above(W: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> NumberOrTensor:
    """Number of singular values of W above ``threshold``."""
    return count_above_from_sv(singular_values(W), threshold)


def spectral_summary(
    W: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, *, rank_tol: float = DEFAULT_RANK_TOL, undefined: float = 0.0,
) -> dict[str, NumberOrTensor]:
    """All spectral metrics of W (or of each matrix of a batch) from a single SVD.

    Keys: effective_rank, effective_rank_normalized, stable_rank, spectral_gap, sv_ratio,
    count_above, count_above_normalized, numerical_rank, numerical_rank_normalized, sigma_max,
    frobenius_norm, num_singular_values.
    """
    _check_matrix(W)
    sv = torch.linalg.svdvals(W.detach().to(torch.float64))  # kept raw: the numerical rank has its own tolerance
    return spectral_summary_from_sv(sv, min(W.shape[-2], W.shape[-1]), threshold, rank_tol=rank_tol, undefined=undefined)


def delta_summary(
    W_prev: torch.Tensor, W_next: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, *,
    rank_tol: float = DEFAULT_RANK_TOL, undefined: float = 0.0,
) -> dict[str, NumberOrTensor]:
    """Spectral summary of the update ``ΔW = W_next − W_prev`` plus its size.

    The difference is taken in fp64 so that small updates of bf16/fp32 weights do not cancel.
    Extra keys: ``delta_frobenius`` = ‖ΔW‖_F, ``previous_frobenius`` = ‖W_prev‖_F and
    ``relative_delta_frobenius`` = ‖ΔW‖_F / ‖W_prev‖_F (``nan`` if W_prev is zero, as the study's
    ``update_to_prev_ratio``).
    """
    _check_matrix(W_prev)
    _check_matrix(W_next)
    if W_prev.shape != W_next.shape:
        raise AnalysisError(
            f"W_prev has shape {tuple(W_prev.shape)} but W_next has {tuple(W_next.shape)}; "
            "compare the same parameter across checkpoints"
        )
    prev64 = W_prev.detach().to(torch.float64)
    delta = W_next.detach().to(device=prev64.device, dtype=torch.float64) - prev64
    summary = spectral_summary(delta, threshold, rank_tol=rank_tol, undefined=undefined)
    delta_norm = torch.linalg.matrix_norm(delta)  # Frobenius, over the last two dims
    prev_norm = torch.linalg.matrix_norm(prev64)
    safe = torch.where(prev_norm > 0, prev_norm, torch.ones_like(prev_norm))
    summary["delta_frobenius"] = _as_output(delta_norm)
    summary["previous_frobenius"] = _as_output(prev_norm)
    summary["relative_delta_frobenius"] = _as_output(torch.where(prev_norm > 0, delta_norm / safe, torch.full_like(prev_norm, math.nan)))
    return summary
