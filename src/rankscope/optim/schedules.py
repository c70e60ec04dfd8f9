"""Learning-rate multipliers (pure functions of the step), as the literature harnesses define them.

All follow `torch.optim.lr_scheduler.LambdaLR` conventions: `step` is the scheduler's step
count, starting at 0. The harnesses differ in which count an update uses:

- rankscope's default (`Method.lr_multiplier`) gives update k (1-based) the multiplier at
  `step = k`, so the first update gets 1/warmup instead of 0 (LORO's run_c4.py skips a zero-lr
  step this way; GaLore's, SLTrain's and ReLoRA's harnesses do not, see docs/methods.md).
- The official ReLoRA and LORO schedules below are used as their harnesses step them: the
  scheduler is stepped after each update, so update k gets the multiplier at `step = k - 1`.
"""

from __future__ import annotations

import math

from rankscope.optim._base import require


def _validate(total_steps: int, warmup_steps: int, min_lr_ratio: float) -> None:
    require(isinstance(total_steps, int) and total_steps >= 1,
            f"invalid total_steps {total_steps!r}: use an integer >= 1")
    require(isinstance(warmup_steps, int) and 0 <= warmup_steps <= total_steps,
            f"invalid warmup_steps {warmup_steps!r}: use an integer in [0, total_steps={total_steps}]")
    require(0.0 <= min_lr_ratio <= 1.0, f"invalid min_lr_ratio {min_lr_ratio!r}: use a number in [0, 1]")


def _cosine_envelope(step: float, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Cosine from 1 at the end of warmup to min_lr_ratio at total_steps, constant after."""
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _cosine(progress: float, min_lr_ratio: float) -> float:
    """The harnesses' cosine decay at `progress`, unclamped (as they compute it)."""
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup step / warmup_steps, then cosine decay to min_lr_ratio at total_steps."""
    _validate(total_steps, warmup_steps, min_lr_ratio)
    if step < warmup_steps:
        return step / warmup_steps
    return _cosine_envelope(step, total_steps, warmup_steps, min_lr_ratio)


def jagged_cosine(
    step: int,
    total_steps: int,
    warmup_steps: int,
    min_lr_ratio: float,
    restart: int | None,
    restart_warmup: int,
    zero_at_restart: bool = True,
) -> float:
    """ReLoRA's cosine_restarts schedule (relora training_utils, `_get_cosine_schedule_with_multiple_warmups_lambda`
    with adjust_step 0) at scheduler step `step`, given the last restart point `restart` <= step.

    Linear warmup step / warmup_steps; afterwards the cosine envelope, except in the
    `restart_warmup` steps from a restart point p: (step - p) / restart_warmup times the
    envelope at p + restart_warmup, which is 0 at the restart point itself. With
    `zero_at_restart=False` the restart point keeps the envelope (rankscope's earlier shifted
    schedule, which never spends an update at lr 0).
    """
    _validate(total_steps, warmup_steps, min_lr_ratio)
    if step < warmup_steps:
        return step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    if restart is not None and 0 <= step - restart < restart_warmup:
        if step == restart and not zero_at_restart:
            return _cosine((step - warmup_steps) / span, min_lr_ratio)
        target = _cosine((restart + restart_warmup - warmup_steps) / span, min_lr_ratio)
        return (step - restart) / max(1, restart_warmup) * target
    return _cosine((step - warmup_steps) / span, min_lr_ratio)


def loro_cosine_restart(
    step: int,
    total_steps: int,
    warmup_steps: int,
    min_lr_ratio: float,
    restart_every: int,
    restart_warmup: int,
    adjust_steps: int,
    eps: float = 1e-6,
) -> float:
    """LORO's `cosine_restart` schedule (LORO-main peft_pretraining/training_utils.py,
    `_get_cosine_schedule_with_multiple_warmups_lambda`, lr_jag_after_warmup off) at scheduler
    step `step`.

    The cosine is displaced by `adjust_steps` (the scripts pass -10% of the run), so warmup runs
    from min_lr_ratio to the displaced cosine's value at step `warmup_steps`, and the cosine
    peaks (1.0) at step warmup_steps - adjust_steps. Every `restart_every` steps the lr re-warms
    linearly from `eps` over `restart_warmup` steps: during warmup towards the warmup line's
    value at the restart, after it towards the cosine's value at the restart.
    """
    _validate(total_steps, warmup_steps, min_lr_ratio)
    require(isinstance(restart_every, int) and restart_every >= 1,
            f"invalid restart_every {restart_every!r}: use an integer >= 1")
    require(adjust_steps + warmup_steps < total_steps,
            f"LORO's schedule needs warmup + adjust steps ({warmup_steps} + {adjust_steps}) below the run's "
            f"{total_steps} steps; shorten the warmup or lengthen the run")
    span = max(1, total_steps - warmup_steps)
    if step < warmup_steps:
        peak = 0.5 * (1.0 + math.cos(math.pi * (-adjust_steps) / span))
        restart_step, restart_number = step % restart_every, step // restart_every
        if restart_step < restart_warmup and restart_number != 0:
            target = restart_number * restart_every / max(1, warmup_steps) * (peak - min_lr_ratio) + min_lr_ratio
            return restart_step / max(1, restart_warmup) * (target - eps) + eps
        return step / max(1, warmup_steps) * (peak - min_lr_ratio) + min_lr_ratio
    shifted = step + adjust_steps
    restart_step, restart_number = shifted % restart_every, shifted // restart_every
    if restart_step < restart_warmup and restart_number > 0:
        target = _cosine((restart_number * restart_every - warmup_steps) / span, min_lr_ratio)
        return restart_step / max(1, restart_warmup) * (target - eps) + eps
    return _cosine((shifted - warmup_steps) / span, min_lr_ratio)


def cyclical_cosine(step: int, cycle_length: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """GoLore's (and ReLoRA's) `cosine` schedule with a cycle length (pkumelon/Golore
    peft_pretraining/training_utils.py `_get_cyclical_cosine_schedule_with_min_lr_lambda`) at
    scheduler step `step`.

    Every cycle of `cycle_length` steps warms up linearly over `warmup_steps` and decays with a
    cosine to `min_lr_ratio` at its end; the first two steps of a later cycle are at 1e-7.
    """
    _validate(cycle_length, warmup_steps, min_lr_ratio)
    cycle_step = step % cycle_length
    if cycle_step < warmup_steps:
        if step != cycle_step and cycle_step < 2:
            return 1e-7
        return cycle_step / max(1, warmup_steps)
    return _cosine((cycle_step - warmup_steps) / max(1, cycle_length - warmup_steps), min_lr_ratio)
