"""Spectron: spectral renormalization with orthogonalization for native low-rank training.

For every factor pair W = B @ A (B d_out x r, A r x d_in) of a group with `factor_pairs=True`:

    X <- X * (1 - lr * weight_decay)                  for X in (B, A), decoupled
    M_X <- beta M_X + (1 - beta) G_X                  momentum (beta = group key `momentum`, 0.9)
    O_X = NewtonSchulz5(M_X)                          Muon quintic, fp32, Frobenius-normalised input
    σ_X ≈ ||X||_2                                     one warm-started power-iteration step
    rho = lr / (σ_A + σ_B + 1)
    A <- A - rho O_A,  B <- B - rho O_B

Then ΔW = -rho (O_B A + B O_A) + rho² O_B O_A, so with exact σ and o = max(||O_A||_2, ||O_B||_2),
||ΔW||_2 <= o lr (σ_A + σ_B) / (σ_A + σ_B + 1) + rho² ||O_B||_2 ||O_A||_2 <= o lr + O(rho²).
Two caveats: the power-iteration estimate is a lower bound of σ, so rho can exceed the
exact-norm value until the warm vectors converge; and Muon's quintic does not converge to
singular values of exactly 1 (they land in roughly [0.7, 1.2]), so o is up to ~1.2, not 1.

The power-iteration vectors (one r-vector or d-vector per factor, on the factor's short side)
and the momenta are state tensors. Other groups are torch.optim.AdamW.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from rankscope.optim._base import RankscopeOptimizer, require, validate_float, validate_int
from rankscope.optim.loro import factor_pairs, validate_factor_group

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate orthogonal polar factor U Vᵀ of `matrix` (Muon's quintic iteration), in fp32.

    The input is Frobenius-normalised so all singular values start in (0, 1]; iterating on the
    short side keeps the Gram matrices r x r for a low-rank factor.
    """
    a, b, c = MUON_COEFFICIENTS
    x = matrix.float()
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if transposed else x


def power_iteration_step(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """One warm-started power-iteration step; updates `vector` in place and returns σ estimate.

    `vector` lives on the short side of `matrix` (length min(rows, cols)); the estimate
    ||X v|| for a unit v never exceeds the true spectral norm.
    """
    x = matrix.float()
    if x.shape[0] < x.shape[1]:
        x = x.mT                      # now rows >= cols and vector has length cols
    v = x.mT @ (x @ vector)
    v = v / (torch.linalg.vector_norm(v) + 1e-30)
    vector.copy_(v)
    return torch.linalg.vector_norm(x @ v)


def _initial_power_vector(factor: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random unit vector (seeded, so runs and resumes are deterministic)."""
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(min(factor.shape), generator=generator, dtype=torch.float32)
    return (v / torch.linalg.vector_norm(v)).to(factor.device)


class SpectronAdamW(RankscopeOptimizer):
    """Spectron for groups with `factor_pairs=True`; torch.optim.AdamW for the other groups.

    Group keys for factor groups: momentum (beta in [0, 1), default 0.9), ns_steps (default 5).
    `betas` / `eps` only matter for the AdamW groups.
    """

    # The power-iteration vector is fp32 bookkeeping even for bf16 factors.
    _preserved_state_keys: ClassVar[dict[str, str]] = {"power_vector": "param_device"}

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _validate_special_group(self, group: dict[str, Any]) -> bool:
        if not group.get("factor_pairs", False):
            return False
        group.setdefault("momentum", 0.9)
        group.setdefault("ns_steps", 5)
        validate_factor_group(group, "Spectron")
        validate_float(group, "momentum", 0.0)
        require(group["momentum"] < 1.0, f"invalid momentum {group['momentum']!r}: use a number in [0, 1)")
        validate_int(group, "ns_steps", 1)
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("factor_pairs", False):
                self._factor_group_step(group)
            else:
                self._plain_adamw_step(group)
        return loss

    def _factor_group_step(self, group: dict[str, Any]) -> None:
        lr, beta = group["lr"], group["momentum"]
        for b, a in factor_pairs(group):
            if b.grad is None or a.grad is None:
                continue
            directions, sigmas = [], []
            for factor in (b, a):
                state = self.state[factor]
                if len(state) == 0:
                    state["momentum_buffer"] = torch.zeros_like(factor, memory_format=torch.preserve_format)
                    state["power_vector"] = _initial_power_vector(factor)
                if group["weight_decay"] > 0.0:
                    factor.mul_(1.0 - lr * group["weight_decay"])
                state["momentum_buffer"].lerp_(factor.grad, 1.0 - beta)
                directions.append(newton_schulz5(state["momentum_buffer"], group["ns_steps"]))
                sigmas.append(power_iteration_step(factor, state["power_vector"]))
            # rho stays a device tensor: no host sync per pair.
            rho = lr / (sigmas[0] + sigmas[1] + 1.0)
            for factor, direction in zip((b, a), directions):
                factor.sub_((rho * direction).to(factor.dtype))


Spectron = SpectronAdamW
