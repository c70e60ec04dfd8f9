"""The settings of `rankscope bench optimizer` and the constants every part shares."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rankscope.errors import ConfigError

NEVER = 10**9  # a projector gap longer than any benchmark run
GRAD_RMS = 1e-3
LR, EPS = 1e-3, 1e-6


@dataclass
class OptimizerBenchConfig:
    preset: str = "tiny"
    device: str = "cpu"
    steps: int = 5  # timed steps per sample
    warmup: int = 2
    repeats: int = 3
    refresh_steps: int = 2  # timed refresh steps per sample (each is an SVD of every matrix)
    rank: int | None = None  # default: the methods' rank for the preset
    svd_oversample: int = 8
    svd_niter: int = 2
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    loro_sizes: list[int] | None = None
    loro_rank: int = 32
    seed: int = 0

    def validate(self) -> None:
        for key in ("steps", "repeats", "refresh_steps", "loro_rank"):
            if getattr(self, key) < 1:
                raise ConfigError(f"bench optimizer: {key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        for key in ("warmup", "svd_oversample", "svd_niter"):
            if getattr(self, key) < 0:
                raise ConfigError(f"bench optimizer: {key.replace('_', '-')} must be >= 0, got {getattr(self, key)}")

