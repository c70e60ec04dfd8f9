"""Stable-SPAM: Adam with adaptive spike clipping, gradient-norm normalisation and momentum resets.

Official code: TianjinYellow/StableSPAM @6a66da1, galore_torch/stablespam.py (`StableSPAM`,
`CosineDecay`); no package exists, so tests/optim/test_optim_stable_spam.py replays that file's
step statement by statement. Update t (global, 1 at the first `step()`), per tensor with its own
step count s:

0. sigma = eta_min + (1 - eta_min)(1 + cos(pi t / (T + 1))) / 2 (torch's CosineAnnealingLR closed
   form, no clamp past T) when `total_steps` T is set, else 1;
1. W <- W (1 - lr * weight_decay), before the update (torch's AdamW form);
2. s <- s + 1; spike clipping: M <- gamma3 M + (1 - gamma3) max|g|, M^ = M / (1 - gamma3^s); entries
   with |g| > M^ become g / max|g| * M^;
3. norm normalisation: n = ||g||, mu <- (gamma1 sigma) mu + (1 - gamma1 sigma) n,
   nu <- gamma2 nu + (1 - gamma2) n², c = mu^ / (sqrt(nu^) + eps) with the bias corrections of s;
   g <- g / n * c when n > 0;
4. momentum reset when t % reset_every == 0: new zero moments and s <- 1 — but, as in the
   reference, this update still advances (and uses) the old moments with s = 1 in its bias
   corrections, and the fresh zeros take effect from the next update;
5. Adam with beta1' = beta1 sigma: m <- beta1' m + (1 - beta1') g, v <- beta2 v + (1 - beta2) g²,
   W <- W - lr / (1 - beta1'^s) * m / (sqrt(v) / sqrt(1 - beta2^s) + eps).

M, mu and nu are per-tensor 0-d state tensors; the global update count is kept in every group
(`stable_spam_updates`), so it is saved with the state dict. `state_dtype` (`_base.py`): "param"
keeps all of them, and the clipped and normalised gradient, in the parameter's dtype, as the
reference (`torch.zeros_like(grad)`); "fp32" in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from rankscope.optim._base import (
    RankscopeOptimizer,
    evaluate_closure,
    new_step_counter,
    require,
    validate_int,
)


def norm_momentum_scale(update: int, total_steps: int | None, eta_min: float) -> float:
    """sigma of the reference's CosineDecay(1.0, total_steps, eta_min), with its arithmetic."""
    if total_steps is None:
        return 1.0
    return eta_min + (1.0 - eta_min) * (1 + math.cos(math.pi * update / (total_steps + 1))) / 2


class StableSPAM(RankscopeOptimizer):
    """Stable-SPAM over every group alike. Keyword settings as the reference's constructor:
    gamma1 (0.7), gamma2 (0.9), gamma3 (0.999), total_steps (T of the sigma schedule; None: no
    schedule), eta_min (0.5), reset_every (update_proj_gap, 1000; 0: no resets); eps 1e-8."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        gamma1: float = 0.7,
        gamma2: float = 0.9,
        gamma3: float = 0.999,
        total_steps: int | None = None,
        eta_min: float = 0.5,
        reset_every: int = 1000,
        state_dtype: str = "fp32",
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype)
        for name, value in (("gamma1", gamma1), ("gamma2", gamma2), ("gamma3", gamma3), ("eta_min", eta_min)):
            require(isinstance(value, (int, float)) and 0.0 <= value < 1.0 or (name == "gamma1" and value == -1),
                    f"invalid {name} {value!r}: use a number in [0, 1)")
        validate_int({"reset_every": reset_every}, "reset_every", 0)
        require(total_steps is None or (isinstance(total_steps, int) and total_steps >= 1),
                f"invalid total_steps {total_steps!r}: use an integer >= 1 or None")
        # The reference's gamma1 = -1 means "beta1".
        self.gamma1 = betas[0] if gamma1 == -1 else gamma1
        self.gamma2, self.gamma3, self.eta_min = gamma2, gamma3, eta_min
        self.total_steps, self.reset_every = total_steps, reset_every
        # A counter as a default: a group without other keys stays a plain group (optim/roles.py).
        self.defaults["stable_spam_updates"] = 0
        for group in self.param_groups:
            group.setdefault("stable_spam_updates", 0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = evaluate_closure(closure)
        update = self.param_groups[0]["stable_spam_updates"] + 1
        sigma = norm_momentum_scale(update, self.total_steps, self.eta_min)
        reset = self.reset_every != 0 and update % self.reset_every == 0
        for group in self.param_groups:
            group["stable_spam_updates"] = update
            for p in group["params"]:
                if p.grad is not None:
                    self._param_step(p, group, sigma, reset)
        return loss

    def _param_step(self, p: torch.Tensor, group: dict[str, Any], sigma: float, reset: bool) -> None:
        p.mul_(1 - group["lr"] * group["weight_decay"])
        # Widened first: its 0-d running statistics would not promote a bf16 gradient.
        grad = p.grad.to(self.state_dtype_of(p))
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = new_step_counter()
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
            for key in ("spike_max", "norm_mean", "norm_sq_mean"):
                state[key] = torch.zeros((), dtype=grad.dtype, device=grad.device)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        step = int(state["step"])

        max_gradient = grad.abs().max()
        spike_max = self.gamma3 * state["spike_max"] + (1 - self.gamma3) * max_gradient
        spike_max_hat = spike_max / (1 - self.gamma3**step)
        spikes = grad.abs() > spike_max_hat
        grad = torch.where(spikes, grad / max_gradient * spike_max_hat, grad)
        state["spike_max"] = spike_max

        grad_norm = torch.linalg.vector_norm(grad)
        decay = self.gamma1 * sigma
        norm_mean = decay * state["norm_mean"] + (1 - decay) * grad_norm
        norm_sq_mean = self.gamma2 * state["norm_sq_mean"] + (1 - self.gamma2) * grad_norm**2
        scaled = (norm_mean / (1 - decay**step)) / (torch.sqrt(norm_sq_mean / (1 - self.gamma2**step)) + group["eps"])
        # The reference's python `if grad_norm > 0` without the host sync: a zero gradient stays zero.
        grad = torch.where(grad_norm > 0, grad / grad_norm * scaled, grad)
        state["norm_mean"], state["norm_sq_mean"] = norm_mean, norm_sq_mean

        if reset:  # the reference's quirk: this update still uses the old moments, with s = 1
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
            state["step"].fill_(1.0)
            step = 1
        beta1, beta2 = group["betas"]
        beta1 = beta1 * sigma
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
        p.add_(exp_avg / denom, alpha=-(group["lr"] / bias_correction1))
