"""GoLoreAdamW: GaLore whose projectors turn uniformly random late in training.

Official code: pkumelon/Golore @7ee5a8a, peft_pretraining/golore_torch/adamw.py `AdamW.step` and
golore_projector.py (what script/Go_pt.sh runs: `--optimizer golore_adamw`). Everything is
GaLoreAdamW (`galore.py`) except, for a group with `rank`:

    refresh at t = 0, T, 2T, ... (t = the steps this matrix took before this one):
        t <  random_from_step: P from the SVD of G (GaLore's projector)
        t >= random_from_step: P Haar-random (`projector.haar_projection`), orthonormal, drawn
                               independently of G
    moments across a refresh: `reproject_moments`, default "first_transient" (the official
    optimizer: the refresh step uses exp_avg rotated into the new basis but never stores it;
    exp_avg_sq is kept), "first" = GoLore's ReLoRA form (rotation stored)

The reference draws Z from the global RNG; here each draw comes from a CPU generator seeded by
(`projection_seed`, the matrix's 1-based position among the optimizer's parameters, t), so the
projectors are the same on every data-parallel rank, on any device and after a resume, and
different seeds of a study draw different projectors. The reference's random projector exists
for the left and right sides only (its "full" case returns nothing), so proj_type full is refused.

Group keys (besides GaLore's): random_from_step (int >= 0, or None = never random; the official
rand_epoch = rand_ratio x num_training_steps), projection_seed (int >= 0, default 0).
"""

from __future__ import annotations

from typing import Any

import torch

from rankscope.optim._base import require, validate_int
from rankscope.optim.galore import GaLoreAdamW, MatrixStack
from rankscope.optim.projector import haar_projection

GOLORE_PROJ_TYPES = ("std", "reverse_std", "left", "right")
_GOLDEN = 0x9E3779B97F4A7C15  # odd multipliers mixing position and step into unrelated seeds
_MIX = 0xBF58476D1CE4E5B9


def draw_seed(projection_seed: int, position: int, step: int) -> int:
    """The generator seed of one matrix's random projector at one refresh."""
    return (projection_seed + position * _GOLDEN + step * _MIX) % 2**63


class GoLoreAdamW(GaLoreAdamW):
    """AdamW with GaLore projections that become Haar-random from `random_from_step` on."""

    method_name = "GoLore"
    proj_types = GOLORE_PROJ_TYPES

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        positions = self.__dict__.setdefault("_positions", {})
        counted = sum(len(group["params"]) for group in self.param_groups[:-1])
        for index, p in enumerate(self.param_groups[-1]["params"], counted + 1):
            positions[p] = index

    def _validate_special_group(self, group: dict[str, Any]) -> bool:
        if "rank" not in group:
            return False
        group.setdefault("reproject_moments", "first_transient")
        group.setdefault("random_from_step", None)
        group.setdefault("projection_seed", 0)
        super()._validate_special_group(group)
        if group["random_from_step"] is not None:
            validate_int(group, "random_from_step", 0)
        validate_int(group, "projection_seed", 0)
        return True

    def _new_projections(self, group: dict[str, Any], stack: MatrixStack, matrices: torch.Tensor,
                         due: list[int]) -> dict[str, torch.Tensor]:
        start = group["random_from_step"]
        if start is None or stack.step < start:
            return super()._new_projections(group, stack, matrices, due)
        key = "proj_right" if stack.side == "right" else "proj_left"
        require(stack.side in ("left", "right"), "GoLore's random projector has a left or a right side only")
        draws = []
        for index in due:
            generator = torch.Generator().manual_seed(
                draw_seed(group["projection_seed"], self._positions[stack.params[index]], stack.step))
            draws.append(haar_projection(matrices, group["rank"], stack.side, generator))
        return {key: draws[0] if matrices.dim() == 2 else torch.stack(draws)}
