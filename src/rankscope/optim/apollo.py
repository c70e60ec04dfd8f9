"""APOLLOAdamW: SGD-like memory, AdamW-level updates; same numbers as apollo_torch.APOLLOAdamW.

Official code: zhuhanqing/APOLLO @76b3472, apollo_torch/apollo.py `AdamW.step` and
apollo_torch/random_projector.py (pip `apollo-torch` 1.0.3, the test oracle). For a group with
`rank`, per m x n gradient G (t = the steps this matrix took before this one):

    refresh at t = 0, T, 2T, ...: P = randn / sqrt(rank), drawn from a generator seeded with the
        matrix's seed, then seed <- next_seed(seed); m >= n: P is rank x n and R = G Pᵀ, else
        P is m x rank and R = Pᵀ G (proj_type std; Gaussian, not orthonormal)
    moments:  m <- b1 m + (1 - b1) R,  v <- b2 v + (1 - b2) R²,  N = m / (sqrt(v) + eps)
              (neither reset nor rotated at a refresh)
    scaling:  channel: phi = ||N|| / (||R|| + 1e-8) per row of G (m >= n) or per column (m < n);
              tensor (APOLLO-Mini): phi = ||N||_F / (||R||_F + 1e-8)
    S = phi * G (the raw full-rank gradient); sqrt(scale) applied before the limiter when
        `scale_front`, else after it
    norm-growth limiter (Fira's, unless `disable_nl`): S <- S / (max(||S|| / ||S_prev||, 1.01) / 1.01)
    W <- W - lr * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) * S,  then W <- W - lr * weight_decay * W

The seed of a matrix is its 1-based position among all parameters of the optimizer's groups in
construction order (the reference's `params_idx`), so the random projections match the reference
draw for draw for the same group order. The generator is the gradient's device's, as in the
reference: CUDA draws differ from CPU ones. `proj: svd` takes GaLore's SVD projector instead of
the random one (apollo_torch's alternative).

State is tensors only (`proj_seed` is an int64 CPU tensor that loading never casts); groups
without `rank` are stepped as the reference steps them (the Hugging Face AdamW form, `_base.py`).
`state_dtype` as GaLoreAdamW's (`galore.py`): under "param" the projection and moments take the
gradient's dtype, as apollo_torch does (apollo.py: `torch.zeros_like(grad)` of the projected
gradient); under "fp32" they, the scaled update and the limiter's norm are fp32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from rankscope.optim._base import require, validate_float
from rankscope.optim.galore import MatrixStack, ProjectedAdamW, moment_mode
from rankscope.optim.projector import projection_side, projector_keys

APOLLO_PROJECTIONS = ("random", "svd")
APOLLO_PROJ_TYPES = ("std", "reverse_std", "left", "right")
SCALE_TYPES = ("channel", "tensor")
NORM_GROWTH_LIMIT = 1.01
NORM_EPS = 1e-8
SEED_DRAWS = 0xF  # random_projector.py ADV_DEFAULT: next_seed keeps the 15th draw


def next_seed(seed: int, draws: int = SEED_DRAWS) -> int:
    """The seed after `seed`: the last of `draws` int64 draws of a CPU generator seeded with it."""
    generator = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (draws,), generator=generator)[-1])


def random_projection(grad: torch.Tensor, rank: int, side: str, seed: int) -> torch.Tensor:
    """P for one gradient: Gaussian / sqrt(rank), drawn in fp32 on the gradient's device, in its dtype."""
    shape = (rank, grad.shape[-1]) if side == "right" else (grad.shape[-2], rank)
    if grad.device.type == "meta":  # shapes only (the memory table): no generator there
        return torch.empty(shape, device=grad.device, dtype=grad.dtype)
    generator = torch.Generator(device=grad.device).manual_seed(seed)
    draw = torch.randn(shape, generator=generator, device=grad.device, dtype=torch.float32) / math.sqrt(rank)
    return draw if grad.dtype == torch.float32 else draw.to(grad.dtype)


class APOLLOAdamW(ProjectedAdamW):
    """AdamW with APOLLO's gradient scaling for groups that carry `rank`.

    Group keys: rank, update_proj_gap (default 200), scale (default 1.0: the reference's alpha,
    applied as sqrt(scale)), proj (random | svd, default random), proj_type (std | reverse_std |
    left | right, default std), scale_type (channel | tensor, default channel).
    """

    method_name = "APOLLO"
    proj_types = APOLLO_PROJ_TYPES
    _preserved_state_keys: ClassVar[dict[str, str]] = {"proj_seed": "cpu"}

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        scale_front: bool = False,
        disable_nl: bool = False,
        batched: bool | None = None,
        state_dtype: str = "fp32",
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, batched=batched,
                         state_dtype=state_dtype)
        require(isinstance(scale_front, bool), f"invalid scale_front {scale_front!r}: use true or false")
        require(isinstance(disable_nl, bool), f"invalid disable_nl {disable_nl!r}: use true or false")
        self.scale_front = scale_front
        self.disable_nl = disable_nl

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        # The reference numbers every parameter of every group (1-based, construction order) and
        # seeds a matrix's projections with its number.
        group = self.param_groups[-1]
        counted = getattr(self, "_params_counted", 0)
        for index, p in enumerate(group["params"], counted + 1):
            if "rank" in group and p.requires_grad:
                self.state[p]["proj_seed"] = torch.tensor(index, dtype=torch.int64)
        self._params_counted = counted + len(group["params"])

    def _validate_special_group(self, group: dict[str, Any]) -> bool:
        if "rank" not in group:
            return False
        for key, value in (("scale", 1.0), ("proj", "random"), ("scale_type", "channel")):
            group.setdefault(key, value)
        super()._validate_special_group(group)
        validate_float(group, "scale", 0.0, strict=True)
        require(group["proj"] in APOLLO_PROJECTIONS,
                f"invalid proj {group['proj']!r} for APOLLO: use one of {', '.join(APOLLO_PROJECTIONS)}")
        require(group["scale_type"] in SCALE_TYPES,
                f"invalid scale_type {group['scale_type']!r} for APOLLO: use one of {', '.join(SCALE_TYPES)}")
        require(moment_mode(group) == "none", "APOLLO keeps its moments across a projector refresh: "
                "reproject_moments is not an APOLLO setting")
        if group["scale_type"] == "channel":
            for p in group["params"]:
                rows, cols = p.shape
                # The reference picks phi's axis from G's shape, not from the side: only the short
                # side's projection leaves one factor per row (m >= n) or column (m < n) of G.
                require(projection_side(p.shape, group["proj_type"]) == projection_side(p.shape, "std"),
                        f"APOLLO's channel scaling needs the short-side projection of a {rows} x {cols} weight: "
                        f"use proj_type std (or scale_type tensor)")
        return True

    def share_work_over(self, process_group: Any) -> None:
        """Nothing shared under DDP: APOLLO's random projectors are seeded draws, cheap on every rank
        (and proj=svd, not the official default, keeps every rank's own SVD)."""

    def _refresh_if_due(self, group: dict[str, Any], stack: MatrixStack, grads: torch.Tensor,
                        shared: Mapping[int, dict[str, torch.Tensor]] | None = None) -> None:
        if group["proj"] == "svd":
            super()._refresh_if_due(group, stack, grads, shared)
            return
        key = projector_keys(stack.side)[0]
        for index, state in enumerate(stack.states):
            if key in state and stack.step % group["update_proj_gap"] != 0:
                continue
            grad = grads if stack.single else grads[index]
            seed = int(state["proj_seed"])
            state[key] = random_projection(grad, group["rank"], stack.side, seed)
            state["proj_seed"].fill_(next_seed(seed))

    def _apply_update(self, group: dict[str, Any], stack: MatrixStack, low: torch.Tensor,
                      directions: torch.Tensor, step_size: float) -> None:
        root_scale = math.sqrt(group["scale"])
        for param, state, projected, direction in zip(stack.params, stack.states, stack.unstack(low),
                                                      stack.unstack(directions)):
            rows, cols = param.shape
            if group["scale_type"] == "channel":
                axis = 0 if rows < cols else 1
                phi = torch.linalg.vector_norm(direction, dim=axis) / (torch.linalg.vector_norm(projected, dim=axis) + NORM_EPS)
                if axis == 1:
                    phi = phi.unsqueeze(1)
            else:
                phi = torch.linalg.vector_norm(direction) / (torch.linalg.vector_norm(projected) + NORM_EPS)
            # In the state's dtype: a 0-d phi (scale_type tensor) would not widen a bf16 gradient.
            update = param.grad.to(direction.dtype) * phi
            if self.scale_front:
                update *= root_scale
            if not self.disable_nl:
                norm = torch.linalg.vector_norm(update)
                previous = state.get("prev_update_norm")
                if previous is None:
                    state["prev_update_norm"] = norm
                else:
                    # The reference's python max(ratio, 1.01) / 1.01, kept on the device.
                    limiter = torch.clamp(norm / (previous + NORM_EPS), min=NORM_GROWTH_LIMIT) / NORM_GROWTH_LIMIT
                    update = update / limiter
                    previous.copy_(norm / limiter)
            if not self.scale_front:
                update *= root_scale
            param.add_(update, alpha=-step_size)
