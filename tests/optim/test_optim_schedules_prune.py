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


def test_magnitude_pruning_threshold_is_torch_quantile_at_any_size():
    """ReLoRA keeps |x| > torch.quantile(|x|, ratio) (linear interpolation). Where ratio·(n - 1)
    is a whole number the quantile is an entry itself and one more entry is zeroed than
    floor(ratio·n) would give; tensors above torch.quantile's 16M limit take the same path."""
    from rankscope.optim.prune import quantile_threshold

    g = torch.Generator().manual_seed(5)
    for n, ratio in ((11, 0.9), (1000, 0.999), (1001, 0.75), (40 * 25, 0.75)):
        values = torch.rand(n, generator=g)
        assert quantile_threshold(values, ratio) == torch.quantile(values, ratio)
    optimizer, pruned, _ = _adam_with_state(1, 11)
    original = optimizer.state[pruned]["exp_avg"].clone()
    prune_adam_state(optimizer, [pruned], ratio=0.9, mode="magnitude")
    kept = optimizer.state[pruned]["exp_avg"] != 0
    assert torch.equal(kept, original.abs() > torch.quantile(original.abs().flatten(), 0.9))
    assert kept.sum().item() == 1  # the quantile sits on the 10th of 11 entries: only the largest survives


# -------------------------------------------------------------------- LORO's cosine_restart
def _loro_60m(step: int) -> float:
    """scripts/loro_c4/llama_60m.sh: 10k steps, warmup 1000, cycle 500, re-warm 5, lr_adjust -1000."""
    from rankscope.optim.schedules import loro_cosine_restart

    return loro_cosine_restart(step, 10_000, 1_000, 0.1, restart_every=500, restart_warmup=5, adjust_steps=-1_000)


def _cos(progress: float) -> float:
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def test_loro_cosine_restart_known_values_of_the_60m_script():
    peak = 0.5 * (1 + math.cos(math.pi * 1000 / 9000))   # the displaced cosine at the end of warmup
    assert _loro_60m(0) == pytest.approx(0.1)             # warmup starts at min_lr_ratio, not 0
    assert _loro_60m(250) == pytest.approx(0.25 * (peak - 0.1) + 0.1)
    assert _loro_60m(500) == pytest.approx(1e-6)           # a restart inside the warmup
    target = 0.5 * (peak - 0.1) + 0.1
    assert _loro_60m(502) == pytest.approx(2 / 5 * (target - 1e-6) + 1e-6)
    assert _loro_60m(505) == pytest.approx(0.505 * (peak - 0.1) + 0.1)
    assert _loro_60m(1000) == pytest.approx(_cos(-1000 / 9000))   # no restart: shifted step 0
    assert _loro_60m(1500) == pytest.approx(1e-6)
    assert _loro_60m(1503) == pytest.approx(3 / 5 * (_cos(-500 / 9000) - 1e-6) + 1e-6)
    assert _loro_60m(2005) == pytest.approx(_cos(5 / 9000))   # the cosine peaks at step 2W
    assert _loro_60m(9999) == pytest.approx(_cos(7999 / 9000))
    assert _loro_60m(9999) == pytest.approx(0.127, abs=5e-4)   # the run ends at 0.127, not 0.1
    # Against rankscope's cosine (10% warmup, update k at step k): outside the re-warm windows the
    # multipliers differ by up to 0.156 (at update 6000); inside them the official lr drops to ~0.
    gaps = {k: abs(_loro_60m(k - 1) - cosine_with_warmup(k, 10_000, 1_000, 0.1)) for k in range(1, 10_001)}
    smooth = [gap for k, gap in gaps.items() if (k - 1) % 500 >= 5]
    assert max(smooth) == pytest.approx(0.1564, abs=1e-3)
    assert max(gaps.values()) > 0.99


def test_loro_cosine_restart_refuses_a_warmup_past_the_run():
    from rankscope.optim.schedules import loro_cosine_restart

    with pytest.raises(HyperparameterError, match="warmup"):
        loro_cosine_restart(0, 100, 100, 0.1, restart_every=10, restart_warmup=2, adjust_steps=0)


def test_cyclical_cosine_follows_golores_15k_schedule():
    """script/Go_pt.sh: warmup 1000, cycle_length 10000, min_lr_ratio 0.1, stopped at 15000."""
    from rankscope.optim.schedules import cyclical_cosine

    def lam(step):
        return cyclical_cosine(step, 10000, 1000, 0.1)

    assert lam(0) == 0.0 and lam(500) == 0.5 and lam(1000) == 1.0
    assert lam(9999) == pytest.approx(0.1, abs=1e-6)
    assert lam(10000) == 1e-7 and lam(10001) == 1e-7  # the restart's first two steps
    assert lam(10002) == pytest.approx(0.002)  # then the same warmup line as the first cycle
    # At 15000 the second cycle is 4000 of its 9000 cosine steps in: 0.1 + 0.9 * (1 + cos(4/9 pi)) / 2.
    assert lam(15000) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 4 / 9)))
    assert lam(15000) == pytest.approx(0.628, abs=1e-3)
