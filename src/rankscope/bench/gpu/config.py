"""The GPU check's settings, path statuses and the schema of gpu_check.json."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from rankscope.errors import ConfigError, did_you_mean

log = logging.getLogger("rankscope.bench")

SCHEMA_NAME = "rankscope-gpu-check/1"
PRECISIONS = ("bf16-pure", "bf16-autocast")
STATUSES = ("ok", "failed", "skipped", "out_of_time")
LORO_PUBLISHED_SPEEDUP = "2x-4x (LORO Table 3, 1B, batch 64/128, sequence 128-1024)"

JSON_SCHEMA: dict[str, Any] = {
    "top": ("schema", "ok", "counts", "device", "environment", "settings", "wall_s", "paths"),
    "path": ("path", "kind", "status", "seconds", "error", "metrics"),
    "metrics": {
        "train": ("method", "precision", "compiled", "steps", "tokens_per_step", "step_s", "tokens_per_s",
                  "model_flops_per_token", "mfu", "period_setting", "period", "periodic_extra_s",
                  "peak_cuda_bytes", "formula_bytes", "peak_over_formula", "weights_and_state_bytes",
                  "loss_first", "loss_last", "total_params"),
        "infer": ("preset", "dense", "factorized", "dtype", "dense_params", "factorized_params", "points",
                  "speedup_geomean", "published_speedup"),
        "landscape": ("preset", "method", "probe_tokens", "forward_s", "landscape_point_s",
                      "landscape_over_forward", "interpolation_point_s", "interpolation_over_forward"),
        "trainer": ("method", "precision", "steps", "checkpoint_step", "val_loss", "resumed_val_loss"),
        "ddp": ("method", "world_size", "steps", "val_loss", "returncode"),
    },
}


@dataclass
class GpuCheckConfig:
    device: str = "cuda"
    preset: str = "60m"
    methods: str | list[str] = "all"
    precisions: tuple[str, ...] = PRECISIONS
    steps: int = 30  # per training path, warm-up included
    warmup_steps: int = 5
    batch_size: int = 16
    seq_len: int = 256
    period: int = 10  # periodic work (projector refresh, exact step, merge) every `period` steps
    compile_methods: tuple[str, ...] = ("full", "loro")
    compile_backend: str = "inductor"
    infer_preset: str = "1b"
    infer_methods: tuple[str, str] = ("full", "loro")  # (dense, factorized)
    infer_batch_size: int = 64
    infer_seq_lens: tuple[int, ...] = (256, 1024)
    infer_iters: int = 3
    landscape_methods: tuple[str, ...] = ("full", "loro")
    probe_sequences: int = 64
    trainer_method: str = "galore"
    trainer_steps: int = 12
    ddp_method: str = "loro"
    ddp_steps: int = 10
    ddp_processes: int | None = None  # None: every visible GPU (skipped below two)
    budget_s: float = 285.0
    peak_tflops: float | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    infer_model_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def method_names(self) -> list[str]:
        from rankscope import methods

        if isinstance(self.methods, str):
            names = methods.names() if self.methods.strip() == "all" else [
                m.strip() for m in self.methods.split(",") if m.strip()]
        else:
            names = list(self.methods)
        return names

    def validate(self) -> None:
        """Every argument checked before any work (and before looking for CUDA)."""
        from rankscope import methods
        from rankscope.models import get_preset

        for key in ("steps", "batch_size", "seq_len", "period", "infer_batch_size", "infer_iters",
                    "probe_sequences", "trainer_steps", "ddp_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"bench gpu: {key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"bench gpu: warmup-steps must be in [0, steps), got {self.warmup_steps} with {self.steps} steps")
        if self.seq_len < 2 or any(t < 2 for t in self.infer_seq_lens) or not self.infer_seq_lens:
            raise ConfigError("bench gpu: sequence lengths must be at least 2 (next-token loss)")
        if self.trainer_steps < 2:
            raise ConfigError("bench gpu: trainer-steps must be at least 2 (a checkpoint half-way, then a resume)")
        if self.budget_s <= 0:
            raise ConfigError(f"bench gpu: budget-s must be positive, got {self.budget_s}")
        if self.ddp_processes is not None and self.ddp_processes < 1:
            raise ConfigError(f"bench gpu: ddp-processes must be at least 1, got {self.ddp_processes}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"bench gpu: --peak-tflops must be positive, got {self.peak_tflops}")
        for precision in self.precisions:
            if precision not in PRECISIONS:
                raise ConfigError(f"bench gpu: precision {precision!r} is not one of {', '.join(PRECISIONS)}"
                                  f"{did_you_mean(precision, PRECISIONS)}")
        for preset in (self.preset, self.infer_preset):
            get_preset(preset)
        names = self.method_names()
        if not names:
            raise ConfigError("bench gpu: --methods is empty; pass 'all' or a comma-separated list")
        for name in [*names, *self.compile_methods, *self.infer_methods, *self.landscape_methods,
                     self.trainer_method, self.ddp_method]:
            methods.get(name)  # unknown names: a did-you-mean error
        if len(self.infer_methods) != 2:
            raise ConfigError("bench gpu: infer methods are a pair (dense, factorized), e.g. full,loro")
        device = torch.device(self.device) if self.device in ("cpu", "cuda") or self.device.startswith("cuda:") else None
        if device is None:
            raise ConfigError(f"bench gpu: device {self.device!r} is not cuda, cuda:N (or cpu for the tests)")

