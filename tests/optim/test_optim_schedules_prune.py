"""LR multipliers against hand-computed values; ReLoRA optimizer-state pruning."""

from __future__ import annotations

import math

import pytest
import torch

from rankscope.optim import HyperparameterError, cosine_with_warmup, prune_adam_state


def envelope(step: float, total: int = 100, warmup: int = 10, floor: float = 0.1) -> float:
    progress = min(1.0, (step - warmup) / (total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("step,expected", [
    (0, 0.0), (1, 0.1), (5, 0.5), (10, 1.0), (55, 0.55), (100, 0.1), (150, 0.1),
    (32.5, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))),
])
def test_cosine_with_warmup_known_values(step, expected):
    assert cosine_with_warmup(step, 100, 10, 0.1) == pytest.approx(expected, abs=1e-12)


def test_cosine_without_warmup_starts_at_one():
    assert cosine_with_warmup(0, 50, 0, 0.0) == 1.0
    assert cosine_with_warmup(50, 50, 0, 0.0) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("call", [
    lambda: cosine_with_warmup(1, 0, 0, 0.1),
    lambda: cosine_with_warmup(1, 10, 20, 0.1),
    lambda: cosine_with_warmup(1, 10, 2, 1.5),
])
def test_schedule_arguments_are_validated(call):
    with pytest.raises(HyperparameterError):
        call()


def _adam_with_state(n_rows: int = 200, n_cols: int = 100):
    torch.manual_seed(0)
    pruned, untouched = torch.nn.Parameter(torch.randn(n_rows, n_cols)), torch.nn.Parameter(torch.randn(50))
    optimizer = torch.optim.AdamW([pruned, untouched])
    pruned.grad, untouched.grad = torch.randn_like(pruned), torch.randn_like(untouched)
    optimizer.step()
    return optimizer, pruned, untouched


def test_random_pruning_zeroes_the_requested_fraction_reproducibly():
    optimizer, pruned, untouched = _adam_with_state()
    before_other = optimizer.state[untouched]["exp_avg"].clone()
    prune_adam_state(optimizer, [pruned], ratio=0.9, generator=torch.Generator().manual_seed(1))
    for key in ("exp_avg", "exp_avg_sq"):
        zero_fraction = (optimizer.state[pruned][key] == 0).float().mean().item()
        assert abs(zero_fraction - 0.9) < 0.01          # 20000 draws: 5 standard deviations
    assert torch.equal(optimizer.state[untouched]["exp_avg"], before_other)

    again, pruned_again, _ = _adam_with_state()
    prune_adam_state(again, [pruned_again], ratio=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.state[pruned_again]["exp_avg"], optimizer.state[pruned]["exp_avg"])


def test_magnitude_pruning_zeroes_the_smallest_entries():
    optimizer, pruned, _ = _adam_with_state(40, 25)
    original = optimizer.state[pruned]["exp_avg"].clone()
    prune_adam_state(optimizer, [pruned], ratio=0.75, mode="magnitude")
    after = optimizer.state[pruned]["exp_avg"]
    zeroed = after == 0
    assert zeroed.sum().item() == int(0.75 * original.numel())
    assert original[zeroed].abs().max() < original[~zeroed].abs().min()
    assert torch.equal(after[~zeroed], original[~zeroed])


def test_prune_rejects_bad_arguments():
    optimizer, pruned, _ = _adam_with_state(4, 4)
    with pytest.raises(HyperparameterError):
        prune_adam_state(optimizer, [pruned], ratio=1.5)
    with pytest.raises(HyperparameterError):
        prune_adam_state(optimizer, [pruned], mode="lottery")
