"""Spectron: spectral renormalization with orthogonalization for native low-rank training.

The official implementation is NVIDIA Emerging-Optimizers' `Spectron`
(emerging_optimizers/orthogonalized_optimizers/spectron.py, Algorithms 1 and 3 of
arXiv:2602.12429). It keeps W = A·Bᵀ with A (m x r), B (n x r); in rankscope's layout
W = B·A with B (d_out x r) = NVIDIA's A and A (r x d_in) = NVIDIA's Bᵀ. For every factor pair of
a group with `factor_pairs=True`:

    X <- X * (1 - lr * weight_decay)                  for X in (B, A), decoupled
    M_X <- beta M_X + (1 - beta) G_X                  momentum (group key `momentum`, 0.9)
    O_X = NewtonSchulz(M_X)                           quintic iteration, 5 steps
    σ_X ≈ ||X||_2                                     warm-started power iteration
    rho = lr / (σ_A + σ_B + 1)
    A <- A - rho O_A,  B <- B - rho O_B

Newton–Schulz (muon_utils.newton_schulz): transpose to the short side, divide by the Frobenius
norm (floored at 1e-7), then X <- aX + (bXXᵀ + c(XXᵀ)²)X with the coefficient set of step i:
"quintic" (NVIDIA's default, five tuned sets applied once each) or "simple" (Muon's single set
(3.4445, -4.7750, 2.0315) repeated). NVIDIA's default matmul precision ("medium") runs the
iteration in bf16 (`ns_precision="bf16"`); "fp32" keeps it in fp32.

Power iteration (Algorithm 3): NVIDIA keeps the left singular vector u of its factors, i.e. a
vector on the long side (d_out for B, d_in for A), and takes `power_iterations` steps
v = Xᵀu/|Xᵀu|, u = Xv/|Xv|, σ = uᵀXv per update (default 1, warm-started). `power_side="short"`
keeps an r-vector instead (rankscope's earlier choice; same estimate after convergence).

The bound: ΔW = -rho (O_B A + B O_A) + rho² O_B O_A, so with exact σ and o = max ||O_X||_2,
||ΔW||_2 <= rho·o·(σ_A + σ_B + rho·o) <= o·lr when rho·o <= 1. It is lr exactly only for o <= 1:
Newton–Schulz lands the singular values of O in a band around 1 (NVIDIA's quintic: within
[0.97, 1.04] for well-conditioned momenta, up to 1.15 for ill-conditioned ones), and a one-step
power iteration estimates σ from below until its vector has converged. tests/optim measure it.

The momenta and the power-iteration vectors are fp32 state tensors under either `state_dtype`
(NVIDIA keeps them so). Other groups are torch.optim.AdamW, with their moments in `state_dtype`
(`_base.py`: "param" is torch's own, bf16 for bf16 weights).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from rankscope.optim._base import (
    RankscopeOptimizer,
    evaluate_closure,
    require,
    validate_float,
    validate_int,
)
from rankscope.optim.loro import factor_pairs, validate_factor_group
from rankscope.optim.sharded import full, local, local_rows

NS_COEFFICIENTS: dict[str, tuple[tuple[float, float, float], ...]] = {
    # NVIDIA muon_utils._COEFFICIENT_SETS["quintic"] (from modded-nanogpt's train_gpt_medium.py).
    "quintic": (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ),
    # Muon's single set, repeated every step (NVIDIA's "simple").
    "simple": ((3.4445, -4.7750, 2.0315),),
}
NS_PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}
POWER_SIDES = ("long", "short")


def check_ns_steps(coefficients: str, steps: int) -> None:
    """NVIDIA applies a multi-set schedule a whole number of times: steps must be a multiple of its length."""
    count = len(NS_COEFFICIENTS[coefficients])
    require(count == 1 or steps % count == 0,
            f"invalid ns_steps {steps}: the {coefficients!r} coefficient schedule has {count} sets, "
            f"so use a multiple of {count}")


def newton_schulz(
    matrix: torch.Tensor, steps: int = 5, coefficients: str = "quintic", precision: str = "fp32", eps: float = 1e-7
) -> torch.Tensor:
    """Approximate orthogonal polar factor U Vᵀ of `matrix`, returned in fp32 (NVIDIA's newton_schulz)."""
    sets = NS_COEFFICIENTS[coefficients]
    check_ns_steps(coefficients, steps)
    x = matrix.float()
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = F.normalize(x, p=2, dim=(-2, -1), eps=eps).to(NS_PRECISIONS[precision])
    for i in range(steps):
        a, b, c = sets[i % len(sets)]
        gram = x @ x.mT
        x = torch.addmm(x, torch.addmm(gram, gram, gram, alpha=c, beta=b), x, alpha=1.0, beta=a)
    x = x.float()
    return x.mT if transposed else x


def power_iteration(matrix: torch.Tensor, vector: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """`steps` power-iteration steps warm-started from the unit `vector`, which is updated in place;
    returns the estimate of ||matrix||_2 (never above it).

    `vector` lives on the rows of `matrix` (a left singular vector estimate) or, if its length
    is the number of columns, on the columns; fp32 throughout.
    """
    x = matrix.float()
    if vector.numel() != x.shape[0]:
        x = x.mT
    u = vector
    for _ in range(steps):
        v = x.mT @ u
        v = v / v.norm().clamp_min(1e-30)
        u = x @ v
        u = u / u.norm().clamp_min(1e-30)
    vector.copy_(u)
    return u @ (x @ v)


def _initial_power_vector(length: int, device: torch.device) -> torch.Tensor:
    """A fixed pseudo-random unit vector (seeded, so runs and resumes are deterministic)."""
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(length, generator=generator, dtype=torch.float32)
    return (v / torch.linalg.vector_norm(v)).to(device)


class SpectronAdamW(RankscopeOptimizer):
    """Spectron for groups with `factor_pairs=True`; torch.optim.AdamW for the other groups.

    Group keys for factor groups: momentum (beta in [0, 1), default 0.9), ns_steps (default 5),
    ns_coefficients ("quintic" | "simple", default "quintic"), ns_precision ("bf16" | "fp32",
    default "bf16"), power_iterations (default 1), power_side ("long" | "short", default "long").
    `betas` / `eps` only matter for the AdamW groups.
    """

    # Momenta and power-iteration vectors stay fp32 even for bf16 factors (as NVIDIA keeps them).
    _preserved_state_keys: ClassVar[dict[str, str]] = {"power_vector": "param_device", "momentum_buffer": "param_device"}

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        state_dtype: str = "fp32",
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype)

    def _validate_special_group(self, group: dict[str, Any]) -> bool:
        if not group.get("factor_pairs", False):
            return False
        group.setdefault("momentum", 0.9)
        group.setdefault("ns_steps", 5)
        group.setdefault("ns_coefficients", "quintic")
        group.setdefault("ns_precision", "bf16")
        group.setdefault("power_iterations", 1)
        group.setdefault("power_side", "long")
        validate_factor_group(group, "Spectron")
        validate_float(group, "momentum", 0.0)
        require(group["momentum"] < 1.0, f"invalid momentum {group['momentum']!r}: use a number in [0, 1)")
        validate_int(group, "ns_steps", 1)
        require(group["ns_coefficients"] in NS_COEFFICIENTS,
                f"invalid ns_coefficients {group['ns_coefficients']!r}: use one of {', '.join(NS_COEFFICIENTS)}")
        check_ns_steps(group["ns_coefficients"], group["ns_steps"])
        require(group["ns_precision"] in NS_PRECISIONS,
                f"invalid ns_precision {group['ns_precision']!r}: use one of {', '.join(NS_PRECISIONS)}")
        validate_int(group, "power_iterations", 1)
        require(group["power_side"] in POWER_SIDES,
                f"invalid power_side {group['power_side']!r}: use one of {', '.join(POWER_SIDES)}")
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = evaluate_closure(closure)
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
                    state["momentum_buffer"] = torch.zeros_like(factor, dtype=torch.float32,
                                                                memory_format=torch.preserve_format)
                    # Long side: d_out for B (its rows), d_in for A (its columns).
                    long_side = factor.shape[0] if factor is b else factor.shape[1]
                    length = long_side if group["power_side"] == "long" else min(factor.shape)
                    state["power_vector"] = _initial_power_vector(length, factor.device)
                if group["weight_decay"] > 0.0:  # NVIDIA's WeightDecayMixin, "decoupled"
                    factor.add_(factor, alpha=-group["weight_decay"] * lr)
                state["momentum_buffer"].lerp_(factor.grad.float(), 1.0 - beta)
                # Under FSDP both need the whole matrix: the momentum and the factor are gathered
                # (2·r·(d_out + d_in) values per pair and step), every rank iterates on them as one
                # process does and keeps its own rows of the direction.
                ortho = newton_schulz(full(state["momentum_buffer"]), group["ns_steps"],
                                      group["ns_coefficients"], group["ns_precision"])
                directions.append(local_rows(ortho, factor))
                sigmas.append(power_iteration(full(factor), state["power_vector"], group["power_iterations"]))
            # rho stays a device tensor: no host sync per pair.
            rho = lr / (sigmas[0] + sigmas[1] + 1.0)
            for factor, direction in zip((b, a), directions):
                local(factor).sub_((rho * direction).to(factor.dtype))
