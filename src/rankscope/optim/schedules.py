"""Learning-rate multipliers (pure functions of the step), as the literature harness defines them.

Both follow `torch.optim.lr_scheduler.LambdaLR` conventions: `step` is the scheduler's step
count, so `step = 0` gives multiplier 0. The GaLore/LORO/ReLoRA scripts skip that zero-lr
step, so their k-th update (k = 1, 2, ...) uses the multiplier at `step = k`: pass the 1-based
index of the update being taken to reproduce them. Then the first update uses 1/warmup
("warmup from ~0"), the last warmup update uses 1, and update `total_steps` uses min_lr_ratio.
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


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup step / warmup_steps, then cosine decay to min_lr_ratio at total_steps."""
    _validate(total_steps, warmup_steps, min_lr_ratio)
    if step < warmup_steps:
        return step / warmup_steps
    return _cosine_envelope(step, total_steps, warmup_steps, min_lr_ratio)
