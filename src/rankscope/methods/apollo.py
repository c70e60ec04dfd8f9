"""APOLLO and APOLLO-Mini: dense weights, AdamW-like updates from moments of a random projection.

The model stays the plain dense LLaMA; the targeted weights go into one `APOLLOAdamW` group
(rank / update_proj_gap / scale / proj / proj_type / scale_type). The optimizer keeps Adam moments
of a random rank-r projection of each gradient only to estimate how much AdamW would scale it,
per channel (APOLLO) or per tensor (APOLLO-Mini, rank 1), and applies that scaling to the raw
full-rank gradient with Fira's norm-growth limiter.

Official code: zhuhanqing/APOLLO @76b3472 (apollo_torch/apollo.py, random_projector.py;
main_pretrain.py L194-221: every attention and MLP projection in the APOLLO group, the embeddings,
norms and head in a plain group placed first; utils/setup.py L150). Per-scale settings from
scripts/pretrain_c4/llama_{60m,130m,350m,1b,7b}_apollo{,_mini}.sh: lr 0.01, T 200, weight decay 0,
no gradient clipping, random projection, proj_type std; APOLLO rank 128 / 192 / 256 / 256 / 256 at
60M / 130M / 350M / 1B / 7B with channel scaling and scale 1; APOLLO-Mini rank 1 with tensor
scaling, scale 128 (192 at 130M), scale_front at 60M-1B, not at 7B. Below 60M (tiny, 20m), where
nothing is published, APOLLO's rank is a quarter of the width (as GaLore's here) and the rest is
60M's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankscope.methods._targets import check_rank_fits, check_targets, plain_first_groups
from rankscope.methods.base import Method, OptimDefaults, ResolvedOptim, require
from rankscope.models import TARGET_LINEARS
from rankscope.optim.apollo import APOLLO_PROJ_TYPES, APOLLO_PROJECTIONS, SCALE_TYPES, APOLLOAdamW

# (rank, scale) of the official scripts per preset; below 60M the width sets APOLLO's rank.
_APOLLO_RANK = {"60m": 128, "130m": 192, "350m": 256, "1b": 256, "7b": 256}
_MINI_SCALE = {"60m": 128.0, "130m": 192.0, "350m": 128.0, "1b": 128.0, "7b": 128.0}


@dataclass
class APOLLOSettings:
    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 1.0  # the scripts' apollo_scale (alpha); the update is scaled by sqrt(scale)
    scale_type: str = "channel"
    # Official value: the 60M-1B Mini scripts pass --scale_front, the 7B one does not; up to the
    # limiter's 1e-8 it does not change the iterates (the limiter is a ratio of norms).
    scale_front: bool = False
    proj: str = "random"
    proj_type: str = "std"
    # Fira's norm-growth limiter; the official default (disable_nl False) keeps it on.
    disable_nl: bool = False
    targets: list[str] = field(default_factory=lambda: list(TARGET_LINEARS))


class APOLLO(Method):
    name = "apollo"
    period_setting = "update_proj_gap"
    description = "APOLLO: dense weights, AdamW's per-channel scaling estimated from a random rank-r projection."
    Settings = APOLLOSettings
    fsdp_refusal = ("its channel-wise scaling and norm-growth limiter take norms over whole rows, columns and updates, "
                    "and its random projection is drawn per whole matrix: not made shard-aware (GaLore and Fira are)")

    @classmethod
    def default_settings(cls, preset: str, model_config: Any) -> APOLLOSettings:
        key = preset.strip().lower()
        return APOLLOSettings(rank=_APOLLO_RANK.get(key, max(1, model_config.hidden_size // 4)))

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        # The scripts: lr 0.01, weight decay 0, grad_clipping 0 (off); APOLLOAdamW's eps 1e-6.
        return OptimDefaults(lr=0.01, weight_decay=0.0, eps=1e-6, grad_clip=0.0)

    def validate(self) -> None:
        s = self.settings
        check_targets(s.targets, self.model_config)
        # The reference accepts any rank; at or above a weight's short side its projection saves
        # nothing, so it is refused here, as for every low-rank method.
        check_rank_fits(s.rank, s.targets, self.model_config)
        require(isinstance(s.update_proj_gap, int) and s.update_proj_gap >= 1,
                f"method.update_proj_gap = {s.update_proj_gap!r} must be an integer >= 1 (steps between projections)")
        require(isinstance(s.scale, (int, float)) and s.scale > 0,
                f"method.scale = {s.scale!r} must be > 0 (APOLLO's alpha: 1 for APOLLO, 128 for APOLLO-Mini)")
        require(s.scale_type in SCALE_TYPES, f"method.scale_type = {s.scale_type!r}: use one of {', '.join(SCALE_TYPES)}")
        require(s.proj in APOLLO_PROJECTIONS, f"method.proj = {s.proj!r}: use one of {', '.join(APOLLO_PROJECTIONS)}")
        require(s.proj_type in APOLLO_PROJ_TYPES,
                f"method.proj_type = {s.proj_type!r}: use one of {', '.join(APOLLO_PROJ_TYPES)}")
        require(s.scale_type == "tensor" or s.proj_type == "std",
                f"method.proj_type = {s.proj_type!r} needs method.scale_type tensor: channel scaling takes one "
                "factor per row or column of the gradient, which only the std projection gives")
        for key in ("scale_front", "disable_nl"):
            require(isinstance(getattr(s, key), bool), f"method.{key} = {getattr(s, key)!r} must be true or false")

    def build_optimizer(self, model: nn.Module, optim: ResolvedOptim) -> torch.optim.Optimizer:
        s = self.settings
        # The plain group first, as main_pretrain.py builds them: a matrix's projection seed is its
        # position among all parameters, so the order decides the random projections.
        groups = plain_first_groups(model, s.targets, optim.weight_decay_scope, self.name, {
            "rank": s.rank, "update_proj_gap": s.update_proj_gap, "scale": float(s.scale), "proj": s.proj,
            "proj_type": s.proj_type, "scale_type": s.scale_type})
        return APOLLOAdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                           scale_front=s.scale_front, disable_nl=s.disable_nl, state_dtype=optim.state_dtype)


class APOLLOMini(APOLLO):
    name = "apollo_mini"
    description = "APOLLO-Mini: APOLLO with a rank-1 projection and one scaling factor per tensor (SGD-like memory)."

    @classmethod
    def default_settings(cls, preset: str, model_config: Any) -> APOLLOSettings:
        key = preset.strip().lower()
        return APOLLOSettings(rank=1, scale=_MINI_SCALE.get(key, 128.0), scale_type="tensor",
                              scale_front=key != "7b")
