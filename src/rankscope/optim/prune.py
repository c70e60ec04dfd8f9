"""ReLoRA's optimizer-state pruning: zero most of the Adam moments of the re-initialised factors."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import Optimizer

from rankscope.optim._base import require
from rankscope.optim.sharded import full, is_sharded, write_full_

PRUNE_MODES = ("random", "magnitude")
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def quantile_threshold(values: torch.Tensor, ratio: float) -> torch.Tensor:
    """torch.quantile(values, ratio) with its default linear interpolation, for any size.

    torch.quantile refuses inputs above 16M entries; the two order statistics around the
    quantile's position ratio·(n - 1) come from kthvalue instead.
    """
    flat = values.flatten().float()
    position = ratio * (flat.numel() - 1)
    below = int(position)
    low = torch.kthvalue(flat, below + 1).values
    if below + 1 >= flat.numel():
        return low
    high = torch.kthvalue(flat, below + 2).values
    return torch.lerp(low, high, position - below)


@torch.no_grad()
def _prune_tensor(tensor: torch.Tensor, ratio: float, mode: str, generator: torch.Generator | None) -> None:
    if is_sharded(tensor):
        # FSDP: prune the whole moment (the same draws, the same quantile as one process), keep our rows.
        whole = full(tensor)
        _prune_tensor(whole, ratio, mode, generator)
        write_full_(tensor, whole)
        return
    if mode == "random":
        # ReLoRA's random_pruning keeps an entry where a uniform draw exceeds the ratio. Drawn on
        # the generator's device (CPU by default), so a seeded run prunes the same entries
        # wherever the state lives.
        device = generator.device if generator is not None else tensor.device
        keep = torch.rand(tensor.shape, generator=generator, device=device) > ratio
        tensor.mul_(keep.to(device=tensor.device, dtype=tensor.dtype))
        return
    # magnitude: ReLoRA's magnitude_pruning keeps entries strictly above the ratio-quantile of
    # |state| (torch.quantile in fp32, cast back to the state's dtype).
    magnitude = tensor.abs()
    threshold = quantile_threshold(magnitude, ratio).to(tensor.dtype)
    tensor.mul_((magnitude > threshold).to(tensor.dtype))


def prune_adam_state(
    optimizer: Optimizer,
    params: Iterable[torch.Tensor],
    ratio: float = 0.999,
    mode: str = "random",
    generator: torch.Generator | None = None,
) -> None:
    """Zero a `ratio` fraction of exp_avg and exp_avg_sq of each parameter in `params`.

    mode "random": each entry is zeroed independently with probability `ratio`.
    mode "magnitude": entries whose magnitude is at or below the ratio-quantile are zeroed.
    Parameters without optimizer state yet are skipped.
    """
    require(isinstance(ratio, (int, float)) and 0.0 <= ratio <= 1.0,
            f"invalid prune ratio {ratio!r}: use a number in [0, 1], e.g. 0.999")
    require(mode in PRUNE_MODES, f"invalid prune mode {mode!r}: use 'random' or 'magnitude'")
    for p in params:
        state = optimizer.state.get(p, {})
        for key in MOMENT_KEYS:
            if key in state:
                _prune_tensor(state[key], float(ratio), mode, generator)
