"""LORO: low-rank Riemannian optimizer (seeds/003, Proposition 4 and Algorithm 2).

W = B @ A with B (d_out x r) and A (r x d_in) are trained on the manifold of rank-r matrices.

`exact_step` is the exact Riemannian step W' = SVD_r(W - lr * P_T(grad W)), computed from B, A
and their gradients only: QR of B and Aᵀ, the tangent step assembled without any d x d matrix,
an SVD of a 2r x 2r matrix, and a balanced retraction (B'ᵀB' = A'A'ᵀ = Σ).

`LoroAdamW` runs Adam on the factors and, every K steps, the exact step:

- approximate steps (paper eq. 11, "B <- B - lr (r/d) grad_B, A <- A - lr (r/d) grad_A", with
  the gradients replaced by their Adam-normalized form as the paper's Algorithm 1 and official
  code do):
      X <- X * (1 - lr_eff * weight_decay)
      X <- X - lr_eff * c * sqrt(1 - beta2^t) / (1 - beta1^t) * m_X / (sqrt(v_X) + eps)
  with lr_eff = group lr * rewarm multiplier and c = `lr_scale` if given, else r / `d_model`
  if given, else r / max(d_out, d_in) of the pair (the official code's fallback).
- exact steps, at optimizer steps K, 2K, ... (counted from 1): the moments are updated with the
  step's gradient, then `exact_step` is applied with directions D_X = m_X / (sqrt(v_X) + eps)
  (`exact_direction="adam"`, the official code) or the raw gradients (`"grad"`, the paper's
  Algorithm 2), and lr = lr_eff * exact_lr_scale * sqrt(1 - beta2^t) / (1 - beta1^t) for "adam",
  lr_eff * exact_lr_scale for "grad". No c and no weight decay on the exact step. Afterwards
  every factor of the group has its Adam moments and bias-correction step zeroed, and the
  group's lr is re-warmed linearly: the next `rewarm_steps` steps use multipliers
  1/R, 2/R, ..., 1 (R = rewarm_steps), on top of whatever lr the scheduler set.

Group keys for factor groups: factor_pairs=True, params ordered [B0, A0, B1, A1, ...];
exact_every (K, int >= 1, default 500); rewarm_steps (int >= 0, default 5); lr_scale or d_model;
exact_lr_scale (default 1.0); exact_direction ("adam" | "grad", default "adam").
Other groups are torch.optim.AdamW.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from rankscope.optim._base import (
    RankscopeOptimizer,
    bias_corrected_step_size,
    new_step_counter,
    require,
    update_adam_moments,
    validate_float,
    validate_int,
)

EXACT_DIRECTIONS = ("adam", "grad")


def exact_step(
    B: torch.Tensor, A: torch.Tensor, grad_B: torch.Tensor, grad_A: torch.Tensor, lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact Riemannian step of LORO (Proposition 4), without forming any d x d matrix.

    With grad_B = G Aᵀ and grad_A = Bᵀ G for the dense gradient G, the result satisfies
    B' @ A' = SVD_r(B A - lr * P_T(G)), P_T(G) = UUᵀG + GVVᵀ - UUᵀGVVᵀ the tangent projection
    at W = B A. The factors come back balanced: B'ᵀB' = A'A'ᵀ = diag(σ_1..σ_r).
    Computed in at least fp32 and returned in B's / A's dtype.
    """
    d_out, rank = B.shape
    require(A.shape[0] == rank and grad_B.shape == B.shape and grad_A.shape == A.shape,
            f"exact_step needs B (d_out x r), A (r x d_in) and gradients of the same shapes, got "
            f"B {tuple(B.shape)}, A {tuple(A.shape)}, grad_B {tuple(grad_B.shape)}, grad_A {tuple(grad_A.shape)}")
    require(rank <= min(d_out, A.shape[1]),
            f"exact_step needs rank r <= min(d_out, d_in), got r={rank} for a {d_out} x {A.shape[1]} weight")
    work_dtype = torch.promote_types(B.dtype, torch.float32)
    b, a = B.to(work_dtype), A.to(work_dtype)
    g_b, g_a = grad_B.to(work_dtype), grad_A.to(work_dtype)

    q_b, r_b = torch.linalg.qr(b)       # B  = Q_B R_B,  Q_B d_out x r
    q_a, r_a = torch.linalg.qr(a.mT)    # Aᵀ = Q_A R_A,  Q_A d_in x r
    # G Q_A = grad_B R_A^{-1}   (d_out x r)   and   (Q_Bᵀ G)ᵀ = grad_Aᵀ R_B^{-1}   (d_in x r)
    g_q_a = torch.linalg.solve_triangular(r_a, g_b, upper=True, left=False)
    gt_q_b = torch.linalg.solve_triangular(r_b, g_a.mT, upper=True, left=False)
    # Parts of the tangent step leaving the current column / row spaces.
    qbar_b, rbar_b = torch.linalg.qr(g_q_a - q_b @ (q_b.mT @ g_q_a))
    qbar_a, rbar_a = torch.linalg.qr(gt_q_b - q_a @ (q_a.mT @ gt_q_b))
    core = r_b @ r_a.mT - lr * (gt_q_b.mT @ q_a)            # Q_Bᵀ (W - lr G) Q_A
    small = torch.cat([
        torch.cat([core, -lr * rbar_a.mT], dim=1),
        torch.cat([-lr * rbar_b, torch.zeros(rbar_b.shape[0], rbar_a.shape[0], dtype=work_dtype,
                                               device=core.device)], dim=1),
    ], dim=0)                                               # (r + k_B) x (r + k_A), k <= r
    u, sigma, vh = torch.linalg.svd(small, full_matrices=False)
    root = sigma[:rank].sqrt()
    new_b = torch.cat([q_b, qbar_b], dim=1) @ (u[:, :rank] * root)
    new_a = (root.unsqueeze(1) * vh[:rank]) @ torch.cat([q_a, qbar_a], dim=1).mT
    return new_b.to(B.dtype), new_a.to(A.dtype)


def factor_pairs(group: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    params = group["params"]
    return [(params[i], params[i + 1]) for i in range(0, len(params), 2)]


def validate_factor_group(group: dict[str, Any], method: str) -> None:
    """A factor group holds [B0, A0, B1, A1, ...] with B d_out x r and A r x d_in."""
    params = group["params"]
    require(len(params) % 2 == 0,
            f"{method} factor group has {len(params)} parameters: list them as pairs [B0, A0, B1, A1, ...]")
    for b, a in factor_pairs(group):
        require(b.dim() == 2 and a.dim() == 2 and b.shape[1] == a.shape[0],
                f"{method} factor pair shapes {tuple(b.shape)} and {tuple(a.shape)} do not form B (d_out x r) "
                "@ A (r x d_in): order the group as [B0, A0, B1, A1, ...]")


class LoroAdamW(RankscopeOptimizer):
    """LORO for groups with `factor_pairs=True`; torch.optim.AdamW for the other groups."""

    _preserved_state_keys: ClassVar[dict[str, str]] = {"loro_step": "cpu", "rewarm_count": "cpu"}

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _validate_special_group(self, group: dict[str, Any]) -> bool:
        if not group.get("factor_pairs", False):
            return False
        group.setdefault("exact_every", 500)
        group.setdefault("rewarm_steps", 5)
        group.setdefault("exact_lr_scale", 1.0)
        group.setdefault("exact_direction", "adam")
        validate_factor_group(group, "LORO")
        validate_int(group, "exact_every", 1)
        validate_int(group, "rewarm_steps", 0)
        validate_float(group, "exact_lr_scale", 0.0)
        require(group["exact_direction"] in EXACT_DIRECTIONS,
                f"invalid exact_direction {group['exact_direction']!r}: use 'adam' or 'grad'")
        require(not ("lr_scale" in group and "d_model" in group),
                "LORO group sets both lr_scale and d_model: give one (c = lr_scale, or c = r / d_model)")
        if "lr_scale" in group:
            validate_float(group, "lr_scale", 0.0, strict=True)
        if "d_model" in group:
            validate_int(group, "d_model", 1)
        return True

    @staticmethod
    def approximate_scale(group: dict[str, Any], b: torch.Tensor, a: torch.Tensor) -> float:
        """c of the approximate step: lr_scale, else r / d_model, else r / max(d_out, d_in)."""
        rank = b.shape[1]
        if "lr_scale" in group:
            return float(group["lr_scale"])
        if "d_model" in group:
            return rank / group["d_model"]
        return rank / max(b.shape[0], a.shape[1])

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

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = new_step_counter()          # bias-correction step, reset by exact steps
            state["loro_step"] = torch.tensor(0, dtype=torch.int64)   # steps taken, decides exact steps
            # No re-warm before the first exact step: the scheduler's own warmup covers the start.
            state["rewarm_count"] = torch.tensor(group["rewarm_steps"], dtype=torch.int64)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _factor_group_step(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        rewarm_steps = group["rewarm_steps"]
        exact_happened = False
        for b, a in factor_pairs(group):
            if b.grad is None or a.grad is None:
                continue
            state_b, state_a = self._init_state(b, group), self._init_state(a, group)
            for state in (state_b, state_a):
                state["loro_step"] += 1
                state["rewarm_count"].clamp_(max=max(rewarm_steps - 1, 0)).add_(1)
                state["step"] += 1
            rewarm = int(state_b["rewarm_count"])
            multiplier = min(1.0, rewarm / rewarm_steps) if rewarm_steps > 0 else 1.0
            lr_eff = group["lr"] * multiplier
            step = int(state_b["step"])
            step_size = bias_corrected_step_size(lr_eff, beta1, beta2, step)
            norm_b = update_adam_moments(state_b, b.grad, beta1, beta2, group["eps"])
            norm_a = update_adam_moments(state_a, a.grad, beta1, beta2, group["eps"])

            if int(state_b["loro_step"]) % group["exact_every"] == 0:
                if group["exact_direction"] == "adam":
                    direction_b, direction_a, lr = norm_b, norm_a, step_size
                else:
                    direction_b, direction_a, lr = b.grad, a.grad, lr_eff
                new_b, new_a = exact_step(b, a, direction_b, direction_a, lr * group["exact_lr_scale"])
                b.copy_(new_b)
                a.copy_(new_a)
                exact_happened = True
                continue

            c = self.approximate_scale(group, b, a)
            for factor, normalized in ((b, norm_b), (a, norm_a)):
                if group["weight_decay"] > 0.0:
                    factor.mul_(1.0 - lr_eff * group["weight_decay"])
                factor.add_(normalized, alpha=-step_size * c)

        if exact_happened:
            self._refresh_factor_states(group)

    def _refresh_factor_states(self, group: dict[str, Any]) -> None:
        """Zero the Adam moments and bias-correction step of every factor, restart the lr re-warm."""
        for p in group["params"]:
            state = self.state[p]
            if len(state) == 0:
                continue
            state["step"].zero_()
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
            state["rewarm_count"].zero_()
