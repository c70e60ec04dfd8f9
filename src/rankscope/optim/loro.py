"""LORO: low-rank Riemannian optimizer (seeds/003, Proposition 4 and Algorithm 2).

W = B @ A with B (d_out x r) and A (r x d_in) are trained on the manifold of rank-r matrices.
The official implementation is LORO-main's LOROAdamW (loro_torch/loro_optim.py); this one is
the same optimizer, step for step.

`exact_step` is the exact Riemannian step W' = SVD_r(W - lr * P_T(grad W)), computed from B, A
and their gradients only: QR of B and Aᵀ, the tangent step assembled without any d x d matrix,
an SVD of a 2r x 2r matrix, and a balanced retraction (B'ᵀB' = A'A'ᵀ = Σ).

`LoroAdamW`, per step, with lr the group's lr and t each tensor's bias-correction step:

- every tensor's Adam moments advance HF-style: m <- β1 m + (1-β1) g, v <- β2 v + (1-β2) g²,
  N = m / (sqrt(v) + eps), step size η_t = lr * sqrt(1 - β2^t) / (1 - β1^t) (eps sits outside
  the bias correction, as in the official optimizer).
- plain groups (embeddings, norms, head): p <- p - η_t N, then p <- p - lr * weight_decay * p.
- factor groups (`factor_pairs=True`), approximate steps (paper eq. 11, with the gradients
  replaced by their Adam-normalized form as Algorithm 1 and the official code do):
      X <- X - η_t * c * N_X,   then X <- X - η_t * weight_decay * X
  with c = `lr_scale` if given, else r / `d_model` if given, else r / max(d_out, d_in).
- factor groups, exact steps at the group's steps K, 2K, ... (counted from 1, K = exact_every):
  `exact_step` with directions D_X = N_X and lr η_t * exact_lr_scale (`exact_direction="adam"`,
  the official code) or the raw gradients and lr * exact_lr_scale (`"grad"`, the paper's
  Algorithm 2). No c and no weight decay on the exact step.
- refresh, after the group's steps R, 2R, ... (R = refresh_every, default K): the Adam moments
  and bias-correction steps are zeroed for the tensors named by `refresh`: "all" (every tensor
  the optimizer holds, as the official scripts' --loro_refresh all), "factors" (this group's:
  official "lrk"), "dense" (the plain groups': official "reg") or "none".

The learning-rate re-warm after a refresh belongs to the schedule (the official cosine_restart
re-warms every group), so it lives in `rankscope.optim.schedules`, not here.

Group keys for factor groups: factor_pairs=True, params ordered [B0, A0, B1, A1, ...];
exact_every (K, int >= 1, default 500); refresh ("all" | "factors" | "dense" | "none", default
"all"); refresh_every (int >= 1, default K); lr_scale or d_model; exact_lr_scale (default 1.0);
exact_direction ("adam" | "grad", default "adam").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from rankscope.optim._base import (
    RankscopeOptimizer,
    bias_corrected_step_size,
    evaluate_closure,
    new_step_counter,
    require,
    update_adam_moments,
    validate_float,
    validate_int,
)
from rankscope.optim.sharded import full, write_full_

EXACT_DIRECTIONS = ("adam", "grad")
REFRESH_SCOPES = ("all", "factors", "dense", "none")


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
    """LORO for groups with `factor_pairs=True`; LORO's own Adam for the other groups."""

    _preserved_state_keys: ClassVar[dict[str, str]] = {"loro_step": "cpu"}

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        state_dtype: str = "fp32",
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype)

    def _validate_special_group(self, group: dict[str, Any]) -> bool:
        if not group.get("factor_pairs", False):
            return False
        group.setdefault("exact_every", 500)
        group.setdefault("refresh", "all")
        group.setdefault("exact_lr_scale", 1.0)
        group.setdefault("exact_direction", "adam")
        validate_factor_group(group, "LORO")
        validate_int(group, "exact_every", 1)
        group.setdefault("refresh_every", group["exact_every"])
        validate_int(group, "refresh_every", 1)
        require(group["refresh"] in REFRESH_SCOPES,
                f"invalid refresh {group['refresh']!r}: use one of {', '.join(REFRESH_SCOPES)}")
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
        loss = evaluate_closure(closure)
        refreshing = []
        for group in self.param_groups:
            if group.get("factor_pairs", False):
                if self._factor_group_step(group):
                    refreshing.append(group)
            else:
                self._dense_group_step(group)
        for group in refreshing:  # after every group has stepped, as the official loop refreshes
            self._refresh(group)
        return loss

    def _state(self, p: torch.Tensor, factor: bool) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = new_step_counter()  # bias-correction step, zeroed by a refresh
            if factor:
                state["loro_step"] = torch.tensor(0, dtype=torch.int64)  # steps taken: decides exact steps
            # In the state dtype: with fp32 moments of bf16 factors, the Adam ratio, the exact
            # step's directions and the update are fp32, rounded into the factor once.
            state["exp_avg"] = self.new_state(p)
            state["exp_avg_sq"] = self.new_state(p)
        return state

    def _dense_group_step(self, group: dict[str, Any]) -> None:
        """The official optimizer's regular step (HF AdamW form, decay after the update)."""
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self._state(p, factor=False)
            state["step"] += 1
            normalized = update_adam_moments(state, p.grad, beta1, beta2, group["eps"])
            p.add_(normalized, alpha=-bias_corrected_step_size(group["lr"], beta1, beta2, int(state["step"])))
            if group["weight_decay"] > 0.0:
                p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def _factor_group_step(self, group: dict[str, Any]) -> bool:
        """Approximate or exact steps of every pair; True when the group's refresh is due."""
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        refresh_due = False
        for b, a in factor_pairs(group):
            if b.grad is None or a.grad is None:
                continue
            state_b, state_a = self._state(b, factor=True), self._state(a, factor=True)
            for state in (state_b, state_a):
                state["loro_step"] += 1
                state["step"] += 1
            taken = int(state_b["loro_step"])
            step_size = bias_corrected_step_size(lr, beta1, beta2, int(state_b["step"]))
            norm_b = update_adam_moments(state_b, b.grad, beta1, beta2, group["eps"])
            norm_a = update_adam_moments(state_a, a.grad, beta1, beta2, group["eps"])
            refresh_due |= taken % group["refresh_every"] == 0

            if taken % group["exact_every"] == 0:
                if group["exact_direction"] == "adam":
                    direction_b, direction_a, exact_lr = norm_b, norm_a, step_size
                else:
                    direction_b, direction_a, exact_lr = b.grad, a.grad, lr
                # Under FSDP the QRs and the SVD need whole factors: gathered (r·(d_out + d_in) values
                # each, the size of the pair itself), stepped as one process does, written back by rows.
                new_b, new_a = exact_step(full(b), full(a), full(direction_b), full(direction_a),
                                          exact_lr * group["exact_lr_scale"])
                write_full_(b, new_b)
                write_full_(a, new_a)
                continue

            c = self.approximate_scale(group, b, a)
            for factor, normalized in ((b, norm_b), (a, norm_a)):
                factor.add_(normalized, alpha=-step_size * c)
                if group["weight_decay"] > 0.0:
                    factor.add_(factor, alpha=-step_size * group["weight_decay"])
        return refresh_due

    def _refresh(self, group: dict[str, Any]) -> None:
        """Zero the Adam moments and bias-correction steps of the tensors `group["refresh"]` names."""
        scope = group["refresh"]
        if scope == "none":
            return
        if scope == "factors":
            tensors = list(group["params"])
        else:
            tensors = [p for g in self.param_groups
                       if scope == "all" or not g.get("factor_pairs", False) for p in g["params"]]
        for p in tensors:
            state = self.state.get(p)
            if not state:
                continue
            state["step"].zero_()
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
