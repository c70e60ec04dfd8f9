"""SPAM: Adam with periodic momentum resets, spike-aware clipping and a warm-up after each reset.

Official code: TianjinYellow/SPAM-Optimizer @e8185fb, galore_torch/SPAM.py (`AdamW`, exported as
SPAM, and `CosineDecay`); no package to test against, so tests/optim/test_optim_spam.py replays
that file's step by hand. Update k = 1, 2, ... (one per `step()`), for every parameter of every
group:

1. momentum reset: if k % reset_every == 0, m <- 0 and v <- 0 (the per-tensor step count t that
   drives the bias correction is not reset);
2. spike clipping: if spike_threshold > 0, k >= clip_start and k % reset_every >= clip_start,
   entries with g² > threshold * v (v before this update) become sign(g) * sqrt(threshold * v);
3. Adam in the Hugging Face form (eps outside the square root, bias correction in the step
   size): N = m / (sqrt(v) + eps), step size lr * (sqrt(1 - b2^t) / (1 - b1^t));
4. warm-up after a reset: the update is scaled by 1 - d(c), d(c) = 0.99 (1 + cos(pi c / (Nw + 1))) / 2
   for c < Nw and 0 after (`CosineDecay(0.99, Nw)`, i.e. torch's CosineAnnealingLR); c starts at
   Nw + 1 (no warm-up before the first reset), grows by one per update and restarts at 0 after the
   update before a reset, so the reset update itself is scaled by 0.01;
5. W <- W - step size * scale * N, then W <- W - lr * weight_decay * W, except in a group with
   `density` (the attention and MLP weights in the official harness), where the reference decays a
   copy (`p.data[mask]`), so weight decay does nothing there; rankscope keeps that.

The counters of steps 1, 2 and 4 are the optimizer's, kept in every group as `spam_updates` and
`spam_warmup` (so they are saved and restored with the state dict); state is tensors only.
`density` < 1 (SPAM's optional sparse momentum) is not implemented: every published script uses 1.
`state_dtype` (`_base.py`): "param" keeps the moments in the parameter's dtype, as the reference
(`torch.zeros_like(p)`); "fp32" keeps them, the clipping and the update in fp32.
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

WARMUP_START = 0.99  # CosineDecay(0.99, Nw): the first update after a reset is scaled by 1 - 0.99


def warmup_scale(count: int, warmup: int) -> float:
    """1 - d(count) of the reference's CosineDecay(0.99, warmup), with its arithmetic."""
    if count >= warmup:
        return 1.0
    # torch's CosineAnnealingLR closed form over T_max = warmup + 1, eta_min 0.
    return 1 - (0 + (WARMUP_START - 0) * (1 + math.cos(math.pi * count / (warmup + 1))) / 2)


class SPAM(RankscopeOptimizer):
    """SPAM's AdamW. Optimizer-wide keyword settings as the reference's constructor: reset_every
    (DeltaT, 500), spike_threshold (5000; 0 turns clipping off), reset_warmup (the warm-up length
    Nw; the official harness passes its lr warm-up steps), clip_start (grad_accu_steps, 20)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        reset_every: int = 500,
        spike_threshold: float = 5000.0,
        reset_warmup: int = 150,
        clip_start: int = 20,
        state_dtype: str = "fp32",
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype)
        settings = {"reset_every": reset_every, "reset_warmup": reset_warmup, "clip_start": clip_start}
        for key, minimum in (("reset_every", 0), ("reset_warmup", 0), ("clip_start", 0)):
            validate_int(settings, key, minimum)
        require(isinstance(spike_threshold, (int, float)) and not isinstance(spike_threshold, bool)
                and spike_threshold >= 0, f"invalid spike_threshold {spike_threshold!r}: use a number >= 0")
        self.reset_every, self.reset_warmup, self.clip_start = reset_every, reset_warmup, clip_start
        self.spike_threshold = float(spike_threshold)
        # Counters as defaults: a group without other keys stays a plain AdamW group (optim/roles.py).
        self.defaults.update(spam_updates=0, spam_warmup=reset_warmup + 1)
        for group in self.param_groups:
            group.setdefault("spam_updates", 0)
            group.setdefault("spam_warmup", reset_warmup + 1)

    def _validate_special_group(self, group: dict[str, Any]) -> bool:
        if "density" not in group:
            return False
        require(group["density"] == 1.0, f"invalid density {group['density']!r}: rankscope's SPAM implements "
                "density 1 only (every published script; sparse momentum is not implemented)")
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = evaluate_closure(closure)
        # Every group holds the same counters (roles split groups after construction; they copy them).
        done, warmup = self.param_groups[0]["spam_updates"], self.param_groups[0]["spam_warmup"]
        update = done + 1
        scale = warmup_scale(warmup, self.reset_warmup)
        reset = self.reset_every != 0 and update % self.reset_every == 0
        clip = (self.spike_threshold != 0 and update >= self.clip_start
                and (self.reset_every == 0 or update % self.reset_every >= self.clip_start))
        for group in self.param_groups:
            self._group_step(group, scale, reset, clip)
        done += 1
        warmup += 1
        if self.reset_every != 0 and (done + 1) % self.reset_every == 0:
            warmup = 0  # the next update resets the moments and starts the warm-up
        for group in self.param_groups:
            group["spam_updates"], group["spam_warmup"] = done, warmup
        return loss

    def _group_step(self, group: dict[str, Any], scale: float, reset: bool, clip: bool) -> None:
        beta1, beta2 = group["betas"]
        dense_decay = "density" not in group
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad.to(self.state_dtype_of(p))  # clipping and moments in the state dtype
            state = self.state[p]
            if "step" not in state:
                state["step"] = new_step_counter()
            if "exp_avg" not in state or reset:
                state["exp_avg"] = self.new_state(p)
                state["exp_avg_sq"] = self.new_state(p)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            state["step"] += 1
            step = int(state["step"])
            if clip:
                spikes = grad.square() > self.spike_threshold * exp_avg_sq
                grad = torch.where(spikes, grad.sign() * torch.sqrt(exp_avg_sq * self.spike_threshold), grad)
            exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = exp_avg_sq.sqrt().add_(group["eps"])
            step_size = group["lr"] * (math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step))
            direction = exp_avg / denom
            if dense_decay:
                p.add_(direction, alpha=-step_size * scale)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
            else:  # the reference's density path: scale the update first; its decay is a no-op
                p.add_(direction.mul_(scale), alpha=-step_size)
