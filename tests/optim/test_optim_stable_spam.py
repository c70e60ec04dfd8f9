"""rankscope.optim.StableSPAM against a step replayed by hand from the official code
(TianjinYellow/StableSPAM @6a66da1, galore_torch/stablespam.py: `CosineDecay` L11-22, `step`
L55-175: sigma L62-66, weight decay L78, spike clipping L104-120, norm normalisation L122-141,
reset L146-152, Adam L154-175), and Stable-SPAM's defining properties. There is no package.

Realistic inputs: weights at 0.02, gradients of 1e-5 .. 1e-2 with injected spikes (1e3x).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from spiky import spiky_gradients

from rankscope.optim import StableSPAM
from rankscope.optim.stable_spam import norm_momentum_scale

SHAPES = ((7,), (4, 5), (12, 8))
LR, EPS = 1e-2, 1e-8
SETTINGS = {"gamma1": 0.85, "gamma2": 0.999, "gamma3": 0.999, "eta_min": 0.5, "reset_every": 15, "total_steps": 40}
STEPS = 40  # resets at 15 and 30; sigma runs from 1 to 0.5


class ReferenceStableSPAM:
    """stablespam.py's StableSPAM.step, statement by statement (amsgrad off, its default)."""

    def __init__(self, params, lr, eps, weight_decay, gamma1, gamma2, gamma3, eta_min, reset_every, total_steps):
        self.params, self.lr, self.eps, self.wd = params, lr, eps, weight_decay
        self.gamma1, self.gamma2, self.theta, self.gap = gamma1, gamma2, gamma3, reset_every
        holder = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        self.decay = torch.optim.lr_scheduler.CosineAnnealingLR(holder, total_steps + 1, eta_min, -1)
        self.holder = holder
        self.total_steps = 0
        self.state = {}

    @torch.no_grad()
    def step(self):
        self.total_steps += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CosineAnnealingLR.step(epoch) is deprecated but is what it calls
            self.decay.step(self.total_steps)
        scale = self.holder.param_groups[0]["lr"]
        for p in self.params:
            p.data.mul_(1 - self.lr * self.wd)
            grad = p.grad
            state = self.state.setdefault(p, {})
            if "exp_avg" not in state:
                state.update(step=0, exp_avg=torch.zeros_like(grad), exp_avg_sq=torch.zeros_like(grad),
                             m_norm_t=0, v_norm_t=0, m_max_t=0)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            max_gradient = torch.max(grad.abs())
            state["step"] += 1
            m_max_t = self.theta * state["m_max_t"] + (1 - self.theta) * max_gradient
            m_max_hat = m_max_t / (1 - self.theta ** state["step"])
            mask = grad.abs() > m_max_hat
            if mask.sum() > 0:
                grad[mask] = grad[mask] / max_gradient * m_max_hat
            state["m_max_t"] = m_max_t
            grad_norm = torch.norm(grad)
            m_norm_t = self.gamma1 * scale * state["m_norm_t"] + (1 - self.gamma1 * scale) * grad_norm
            v_norm_t = self.gamma2 * state["v_norm_t"] + (1 - self.gamma2) * grad_norm**2
            m_norm_hat = m_norm_t / (1 - (self.gamma1 * scale) ** state["step"])
            v_norm_hat = v_norm_t / (1 - self.gamma2 ** state["step"])
            c_norm_t = m_norm_hat / (torch.sqrt(v_norm_hat) + self.eps)
            if grad_norm > 0:
                grad = grad / grad_norm * c_norm_t
            state["m_norm_t"], state["v_norm_t"] = m_norm_t, v_norm_t
            if self.gap != 0 and self.total_steps % self.gap == 0:
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
                state["step"] = 1
            beta1, beta2 = 0.9 * scale, 0.999
            bias_correction1 = 1 - beta1 ** state["step"]
            bias_correction2 = 1 - beta2 ** state["step"]
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(self.eps)
            p.add_(exp_avg / denom, alpha=-(self.lr / bias_correction1))


def _gradients(step: int) -> list[torch.Tensor]:
    return spiky_gradients(SHAPES, seed=900 + step)


def _params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(0.02 * torch.randn(*s, generator=g)) for s in SHAPES]


def _run(make, steps=STEPS, weight_decay=0.1):
    params = _params()
    optimizer = make(params, weight_decay)
    for step in range(steps):
        for p, grad in zip(params, _gradients(step)):
            p.grad = grad
        optimizer.step()
    return params, optimizer


def _ours(params, weight_decay):
    return StableSPAM([{"params": params}], lr=LR, eps=EPS, weight_decay=weight_decay, **SETTINGS)


def _reference(params, weight_decay):
    return ReferenceStableSPAM(params, LR, EPS, weight_decay, **SETTINGS)


def test_steps_bit_identically_to_the_official_step():
    ours, _ = _run(_ours)
    theirs, _ = _run(_reference)
    for index, (a, b, w) in enumerate(zip(ours, theirs, _params())):
        assert (b - w).abs().max() > 0
        assert torch.equal(a, b), f"tensor {index} differs by {float((a - b).abs().max()):.3g}"


def test_sigma_is_torchs_cosine_annealing_without_a_clamp():
    holder = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(holder, 41, 0.5, -1)
    for update in (1, 20, 40, 41, 60):
        with pytest.warns(UserWarning):
            cosine.step(update)
        assert norm_momentum_scale(update, 40, 0.5) == holder.param_groups[0]["lr"]
    assert norm_momentum_scale(7, None, 0.5) == 1.0


def test_a_reset_update_leaves_fresh_zero_moments_and_restarts_the_step_count():
    """After update 15 the stored moments are zeros and s = 1; that update itself advanced the old
    moments (the reference's quirk; the bit-for-bit test above fails if the reset takes effect at once)."""
    params, optimizer = _run(_ours, steps=15)
    state = optimizer.state[params[2]]
    assert not state["exp_avg"].any() and not state["exp_avg_sq"].any() and int(state["step"]) == 1
    params, optimizer = _run(_ours, steps=16)
    state = optimizer.state[params[2]]
    assert state["exp_avg"].any() and int(state["step"]) == 2
    assert bool(state["norm_sq_mean"] > 0)  # the norm statistics are never reset


def test_spikes_are_clipped_to_the_running_maximum():
    p = torch.nn.Parameter(torch.zeros(4))
    optimizer = StableSPAM([{"params": [p]}], lr=LR, reset_every=0)
    for _ in range(5):
        p.grad = torch.full((4,), 1e-3)
        optimizer.step()
    running = optimizer.state[p]["spike_max"].clone()
    p.grad = torch.tensor([1e-3, 1.0, -1e-3, 1e-3])
    optimizer.step()
    expected = 0.999 * running + 0.001 * 1.0
    assert torch.equal(optimizer.state[p]["spike_max"], expected)
    # The spike was scaled to M^ before the norm step; the norm's running mean saw ||clipped||.
    hat = expected / (1 - 0.999**6)
    assert float(hat) < 1.0


def test_the_counter_survives_a_state_dict_round_trip():
    import io

    params, optimizer = _run(_ours, steps=20)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    fresh = _ours(params, 0.1)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert fresh.param_groups[0]["stable_spam_updates"] == 20
