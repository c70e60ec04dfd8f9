"""rankscope.optim.SPAM against a step replayed by hand from the official code
(TianjinYellow/SPAM-Optimizer @e8185fb, galore_torch/SPAM.py: counters L134-138, warm-up scale
L194, reset L226-229, spike clipping L236-246, Adam and the density path L249-282, bookkeeping
L285-293; `CosineDecay` L12-59), and SPAM's defining properties. There is no package to import.

Realistic inputs: weights at 0.02, gradients of 1e-5 .. 1e-2 with injected spikes (1e3x), eps 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch
from spiky import spiky_gradients

from rankscope.optim import SPAM
from rankscope.optim.spam import warmup_scale

BLOCK_SHAPES = ((12, 8), (6, 10))
PLAIN_SHAPES = ((7,), (4, 5))
LR, EPS = 1e-2, 1e-6
SETTINGS = {"reset_every": 25, "spike_threshold": 50.0, "reset_warmup": 10, "clip_start": 5}
STEPS = 80  # three resets (25, 50, 75), clipping windows in between


class ReferenceSPAM:
    """SPAM.py's AdamW.step, statement by statement (density 1: the mask selects every entry, so
    the moments hold the flattened gradient; the warm-up scale from torch's CosineAnnealingLR)."""

    def __init__(self, groups, lr, eps, weight_decay, warmup_steps, threshold, delta_t, accu_steps):
        self.groups, self.lr, self.eps, self.wd = groups, lr, eps, weight_decay
        self.thres, self.delta_t, self.accu, self.warmup_steps = threshold, delta_t, accu_steps, warmup_steps
        self.total_step, self.current_step = 0, warmup_steps + 1
        self.state = {}
        self._new_decay()

    def _new_decay(self):
        holder = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.99)
        self.decay = torch.optim.lr_scheduler.CosineAnnealingLR(holder, self.warmup_steps + 1, 0, -1)
        self.holder = holder

    def _dr(self, current):
        if current >= self.warmup_steps:
            return 0
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CosineAnnealingLR.step(epoch) is deprecated but is what SPAM calls
            self.decay.step(current)
        return self.holder.param_groups[0]["lr"]

    @torch.no_grad()
    def step(self):
        scale_factor = 1 - self._dr(self.current_step)
        for group in self.groups:
            for p in group["params"]:
                state = self.state.setdefault(p, {"step": 0})
                density = "density" in group
                grad = p.grad[torch.ones_like(p, dtype=torch.bool)] if density else p.grad
                if "exp_avg" not in state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
                if (self.total_step + 1) % self.delta_t == 0:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                if self.thres != 0:
                    current = self.total_step + 1
                    if current >= self.accu:
                        mask = (grad**2) > (self.thres * exp_avg_sq)
                        if current % self.delta_t >= self.accu:
                            grad[mask] = grad[mask].sign() * torch.sqrt(exp_avg_sq[mask] * self.thres)
                exp_avg.mul_(0.9).add_(grad, alpha=1.0 - 0.9)
                exp_avg_sq.mul_(0.999).addcmul_(grad, grad, value=1.0 - 0.999)
                denom = exp_avg_sq.sqrt().add_(self.eps)
                step_size = self.lr
                step_size *= math.sqrt(1.0 - 0.999 ** state["step"]) / (1.0 - 0.9 ** state["step"])
                norm_grad = exp_avg / denom
                if density:
                    full = p.grad.clone()
                    full[torch.ones_like(p, dtype=torch.bool)] = norm_grad
                    full.mul_(scale_factor)
                    p.add_(full, alpha=-step_size)
                else:
                    p.add_(norm_grad, alpha=-step_size * scale_factor)
                    if self.wd > 0:
                        p.add_(p, alpha=-self.lr * self.wd)
        self.total_step += 1
        self.current_step += 1
        if self.total_step != 0 and (self.total_step + 1) % self.delta_t == 0:
            self.current_step = 0
            self._new_decay()


def _gradients(step: int) -> list[torch.Tensor]:
    return spiky_gradients(PLAIN_SHAPES + BLOCK_SHAPES, seed=500 + step)


def _params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(0.02 * torch.randn(*s, generator=g)) for s in PLAIN_SHAPES + BLOCK_SHAPES]


def _groups(params):
    return [{"params": params[:2]}, {"params": params[2:], "density": 1.0}]


def _run(make, steps=STEPS, weight_decay=0.1):
    params = _params()
    optimizer = make(_groups(params), weight_decay)
    for step in range(steps):
        for p, grad in zip(params, _gradients(step)):
            p.grad = grad
        optimizer.step()
    return params, optimizer


def _ours(groups, weight_decay, **overrides):
    return SPAM(groups, lr=LR, eps=EPS, weight_decay=weight_decay, **{**SETTINGS, **overrides})


def _reference(groups, weight_decay):
    return ReferenceSPAM(groups, LR, EPS, weight_decay, SETTINGS["reset_warmup"], SETTINGS["spike_threshold"],
                         SETTINGS["reset_every"], SETTINGS["clip_start"])


def test_steps_bit_identically_to_the_official_step():
    ours, _ = _run(_ours)
    theirs, _ = _run(_reference)
    initial = _params()
    for index, (a, b, w) in enumerate(zip(ours, theirs, initial)):
        assert (b - w).abs().max() > 0
        assert torch.equal(a, b), f"tensor {index} differs by {float((a - b).abs().max()):.3g}"


def test_the_warmup_scale_is_torchs_cosine_annealing_and_the_reset_update_gets_one_percent():
    holder = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.99)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(holder, 11, 0, -1)
    for count in range(10):
        with pytest.warns(UserWarning):
            cosine.step(count)
        assert warmup_scale(count, 10) == 1 - holder.param_groups[0]["lr"]
    assert warmup_scale(0, 10) == pytest.approx(0.01) and warmup_scale(10, 10) == warmup_scale(11, 10) == 1.0


def test_moments_reset_exactly_at_the_period_and_the_step_count_does_not():
    for steps, zeroed in ((24, False), (25, True), (26, False)):
        params, optimizer = _run(_ours, steps=steps)
        state = optimizer.state[params[2]]
        assert int(state["step"]) == steps  # bias correction keeps counting through a reset
        # After update 25 the moments hold only that update's gradient: m = (1 - b1) g exactly.
        grad = _gradients(steps - 1)[2]
        assert torch.equal(state["exp_avg"], torch.zeros_like(grad).add_(grad, alpha=0.1)) == zeroed
    assert optimizer.param_groups[0]["spam_updates"] == 26 and optimizer.param_groups[0]["spam_warmup"] == 2


def test_a_spike_is_clipped_to_the_threshold_times_the_second_moment():
    p = torch.nn.Parameter(torch.zeros(4))
    optimizer = SPAM([{"params": [p]}], lr=LR, eps=EPS, reset_every=0, spike_threshold=5000.0, clip_start=4)
    for _ in range(3):
        p.grad = torch.full((4,), 1e-3)
        optimizer.step()
    v = optimizer.state[p]["exp_avg_sq"].clone()
    p.grad = torch.tensor([1e-3, 1.0, -1.0, 2e-3])  # two spikes, one ordinary large value
    m = optimizer.state[p]["exp_avg"].clone()
    optimizer.step()
    clipped = torch.tensor([1e-3, 1.0, -1.0, 2e-3])
    limit = torch.sqrt(v * 5000.0)
    clipped[1:3] = torch.sign(clipped[1:3]) * limit[1:3]
    assert torch.equal(optimizer.state[p]["exp_avg"], m.mul(0.9).add(clipped, alpha=0.1))
    assert 2e-3**2 <= 5000.0 * float(v[3]) < 1.0  # 2e-3 is within the threshold and kept; 1.0 is not


def test_weight_decay_is_a_no_op_on_the_density_group_as_in_the_reference():
    decayed, _ = _run(_ours, steps=3, weight_decay=0.5)
    plain, _ = _run(_ours, steps=3, weight_decay=0.0)
    assert torch.equal(decayed[2], plain[2]) and not torch.equal(decayed[0], plain[0])


def test_the_counters_survive_a_state_dict_round_trip():
    import io

    params, optimizer = _run(_ours, steps=30)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    fresh = _ours(_groups(params), 0.1)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert fresh.param_groups[1]["spam_updates"] == 30 and fresh.param_groups[1]["spam_warmup"] == 6
