"""The GPU check's settings, path statuses and the schema of gpu_check.json."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from rankscope.errors import ConfigError, did_you_mean

log = logging.getLogger("rankscope.bench")

SCHEMA_NAME = "rankscope-gpu-check/2"
PRECISIONS = ("bf16-pure", "bf16-autocast")
STATUSES = ("ok", "failed", "skipped", "out_of_time")
LORO_PUBLISHED_SPEEDUP = "2x-4x (LORO Table 3, 1B, batch 64/128, sequence 128-1024)"

# Seconds a path of each kind may run before the watchdog kills it (`limits_s` overrides them).
# Sized for one H100 with room to spare: a path that needs more is hung or badly slow, and
# either way the check moves on. Compilation (inductor, fwd + bwd of a 60M model) is the slowest.
PATH_LIMITS_S: dict[str, float] = {
    "environment": 30.0, "compile": 60.0, "train": 20.0, "optimizer_state": 30.0, "dynamics": 30.0,
    "trainer": 60.0, "memory": 45.0, "projector": 30.0, "throughput": 30.0, "process_group": 30.0,
    "ddp": 90.0, "infer": 30.0, "landscape": 20.0,
}

JSON_SCHEMA: dict[str, Any] = {
    "top": ("schema", "ok", "complete", "counts", "device", "settings", "wall_s", "log", "paths", "pending"),
    "path": ("path", "kind", "status", "seconds", "error", "metrics"),
    "metrics": {
        "environment": ("torch", "cuda", "cudnn", "nccl", "triton", "python", "platform", "cpu_count",
                        "torch_threads", "load_average_1min", "float32_matmul_precision", "device_name",
                        "device_count", "capability", "total_memory_bytes", "peak_bf16_tflops"),
        "compile": ("method", "precision", "backend", "layers", "steps", "compile_s", "step_s", "tokens_per_s",
                    "unique_graphs", "graph_breaks", "eager_losses", "compiled_losses", "max_loss_rel_diff"),
        "train": ("method", "precision", "steps", "tokens_per_step", "step_s", "tokens_per_s",
                  "model_flops_per_token", "mfu", "period_setting", "period", "periodic_extra_s",
                  "peak_cuda_bytes", "weights_and_state_bytes", "state_dtypes", "loss_first", "loss_last",
                  "total_params"),
        "optimizer_state": ("precision", "state_dtype", "state_dtypes", "ratchet_steps",
                            "ratchet_bf16_exp_avg_sq", "ratchet_fp32_exp_avg_sq", "ratchet_ratio"),
        "dynamics": ("preset", "method", "precision", "dynamics_every", "measured_steps", "targeted_fp32_bytes",
                     "plain_step_peak_bytes", "measured_step_peak_bytes", "extra_bytes",
                     "extra_over_targeted_fp32"),
        "trainer": ("method", "precision", "steps", "checkpoint_step", "val_loss", "resumed_val_loss",
                    "dynamics_steps", "rng_states_saved", "warm_start_steps", "warm_start_state_entries"),
        "memory": ("preset", "method", "precision", "seq_len", "micro_batch", "total_params",
                   "weights_and_state_bytes", "peak_bytes", "peak_bytes_checkpointed", "activation_bytes",
                   "activation_bytes_checkpointed", "estimate_bytes", "estimate_bytes_checkpointed"),
        "projector": ("shape", "rank", "exact_s", "randomized_s", "svd_oversample", "svd_niter",
                      "exact_over_randomized"),
        "throughput": ("preset", "method", "precision", "batch_size", "seq_len", "steps", "step_s", "tokens_per_s",
                       "model_flops_per_token", "mfu", "peak_cuda_bytes", "total_params"),
        "process_group": ("backend", "world_size", "nccl", "init_s", "all_reduce_s", "barrier_s", "destroy_s"),
        "ddp": ("method", "world_size", "steps", "val_loss", "returncode"),
        "infer": ("preset", "dense", "factorized", "dtype", "dense_params", "factorized_params", "points",
                  "speedup_geomean", "published_speedup"),
        "landscape": ("preset", "method", "probe_tokens", "forward_s", "landscape_point_s",
                      "landscape_over_forward", "interpolation_point_s", "interpolation_over_forward"),
    },
}


@dataclass
class GpuCheckConfig:
    device: str = "cuda"
    preset: str = "60m"  # the train, compile, dynamics, trainer and landscape paths
    methods: str | list[str] = "all"  # trained at both precisions (train/<method>/<precision>)
    precisions: tuple[str, ...] = PRECISIONS
    steps: int = 8  # per train path, warm-up included
    warmup_steps: int = 2
    batch_size: int = 8
    seq_len: int = 256
    # Periodic work (projector refresh, exact step, merge) every `period` steps: once in the
    # warm-up, once timed (a GaLore refresh at 60M is 56 SVDs).
    period: int = 4
    compile_methods: tuple[str, ...] = ("full", "sltrain", "loro")  # run first: compilation is the slowest
    compile_backend: str = "inductor"
    # Layers of the compiled model (None: the preset's): compile time grows with depth, and two
    # blocks already show a lowering error, a recompile or a loss that drifts from eager.
    compile_layers: int | None = 2
    compile_steps: int = 5  # eager, then compiled, from the same weights on the same batches
    compile_loss_rtol: float = 1e-2  # compiled vs eager loss, per step
    state_methods: tuple[str, ...] = ("full", "galore", "loro")  # whose optimizer state must be fp32
    ratchet_steps: int = 300  # the bf16 exp_avg_sq repro
    dynamics_methods: tuple[str, ...] = ("full", "loro")
    trainer_method: str = "galore"  # checkpoint + resume through rankscope.train
    trainer_steps: int = 6
    rng_method: str = "lora"  # its adapter dropout draws from the device's RNG, which the resume restores
    warm_start_steps: int = 2  # ReLoRA's full-rank warm start, through rankscope.train
    memory_preset: str = "1b"
    memory_methods: tuple[str, ...] = ("full", "galore")
    memory_seq_len: int = 256
    projector_shape: tuple[int, int] = (2048, 5461)  # a 1B MLP weight
    projector_rank: int = 512  # GaLore's rank at 1B
    throughput_presets: tuple[str, ...] = ("60m", "350m")
    throughput_methods: tuple[str, ...] = ("full", "galore", "loro", "sltrain")
    throughput_precision: str = "bf16-autocast"
    throughput_batch_size: int = 16
    throughput_steps: int = 8  # warm-up included (the first 3 are not timed)
    infer_preset: str = "1b"
    infer_methods: tuple[str, str] = ("full", "loro")  # (dense, factorized)
    infer_batch_size: int = 64
    infer_seq_lens: tuple[int, ...] = (1024,)
    infer_iters: int = 3
    landscape_methods: tuple[str, ...] = ("loro",)
    probe_sequences: int = 64
    ddp_method: str = "loro"
    ddp_steps: int = 10
    ddp_processes: int | None = None  # None: every visible GPU (skipped below two)
    budget_s: float = 240.0  # the whole check; a path still running then is killed
    limits_s: dict[str, float] = field(default_factory=dict)  # per kind, over PATH_LIMITS_S
    worker_start_s: float = 90.0  # a worker process that is not ready by then counts as failed
    peak_tflops: float | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    infer_model_overrides: dict[str, Any] = field(default_factory=dict)  # the infer and memory presets
    seed: int = 0

    def method_names(self) -> list[str]:
        from rankscope import methods

        if isinstance(self.methods, str):
            names = methods.names() if self.methods.strip() == "all" else [
                m.strip() for m in self.methods.split(",") if m.strip()]
        else:
            names = list(self.methods)
        return names

    def limit_s(self, kind: str) -> float:
        return float(self.limits_s.get(kind, PATH_LIMITS_S[kind]))

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> GpuCheckConfig:
        """The config back from `dataclasses.asdict` after a JSON round trip (lists -> tuples)."""
        tuples = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, tuple)}
        return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in settings.items()})

    def validate(self) -> None:
        """Every argument checked before any work (and before looking for CUDA)."""
        from rankscope import methods
        from rankscope.models import get_preset

        for key in ("steps", "batch_size", "seq_len", "period", "compile_steps", "ratchet_steps", "trainer_steps",
                    "memory_seq_len", "projector_rank", "throughput_batch_size", "throughput_steps",
                    "infer_batch_size", "infer_iters", "probe_sequences", "ddp_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"bench gpu: {key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"bench gpu: warmup-steps must be in [0, steps), got {self.warmup_steps} with {self.steps} steps")
        if self.seq_len < 2 or self.memory_seq_len < 2 or any(t < 2 for t in self.infer_seq_lens) or not self.infer_seq_lens:
            raise ConfigError("bench gpu: sequence lengths must be at least 2 (next-token loss)")
        if self.trainer_steps < 2:
            raise ConfigError("bench gpu: trainer-steps must be at least 2 (a checkpoint half-way, then a resume)")
        if self.compile_layers is not None and self.compile_layers < 1:
            raise ConfigError(f"bench gpu: compile-layers must be at least 1 (or None), got {self.compile_layers}")
        if self.throughput_steps < 4:
            raise ConfigError("bench gpu: throughput-steps must be at least 4 (3 warm-up steps, then timed ones)")
        if self.warm_start_steps < 1:
            raise ConfigError("bench gpu: warm-start-steps must be at least 1 (the ReLoRA warm-start path)")
        if len(self.projector_shape) != 2 or min(self.projector_shape) < self.projector_rank:
            raise ConfigError(f"bench gpu: projector-shape {self.projector_shape} must be two sizes of at least "
                              f"projector-rank {self.projector_rank}")
        for key in ("budget_s", "worker_start_s", "compile_loss_rtol"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"bench gpu: {key.replace('_', '-')} must be positive, got {getattr(self, key)}")
        for kind, seconds in self.limits_s.items():
            if kind not in PATH_LIMITS_S:
                raise ConfigError(f"bench gpu: no path kind {kind!r} to limit{did_you_mean(kind, PATH_LIMITS_S)} "
                                  f"(kinds: {', '.join(PATH_LIMITS_S)})")
            if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds <= 0:
                raise ConfigError(f"bench gpu: the limit of {kind} must be a positive number of seconds, got {seconds!r}")
        if self.ddp_processes is not None and self.ddp_processes < 1:
            raise ConfigError(f"bench gpu: ddp-processes must be at least 1, got {self.ddp_processes}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"bench gpu: --peak-tflops must be positive, got {self.peak_tflops}")
        for precision in (*self.precisions, self.throughput_precision):
            if precision not in PRECISIONS:
                raise ConfigError(f"bench gpu: precision {precision!r} is not one of {', '.join(PRECISIONS)}"
                                  f"{did_you_mean(precision, PRECISIONS)}")
        for preset in (self.preset, self.infer_preset, self.memory_preset, *self.throughput_presets):
            get_preset(preset)
        names = self.method_names()
        if not names:
            raise ConfigError("bench gpu: --methods is empty; pass 'all' or a comma-separated list")
        for name in [*names, *self.compile_methods, *self.state_methods, *self.dynamics_methods, *self.memory_methods,
                     *self.throughput_methods, *self.infer_methods, *self.landscape_methods, self.trainer_method,
                     self.rng_method, self.ddp_method]:
            methods.get(name)  # unknown names: a did-you-mean error
        if len(self.infer_methods) != 2:
            raise ConfigError("bench gpu: infer methods are a pair (dense, factorized), e.g. full,loro")
        if not (self.device in ("cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"bench gpu: device {self.device!r} is not cuda, cuda:N or cpu (tiny shapes)")


# `--device cpu`: the same paths at tiny shapes, so that the whole check runs (and is tested) on a
# CPU in well under a minute. Options given on the command line still win.
CPU_SETTINGS: dict[str, Any] = dict(
    preset="tiny", steps=4, warmup_steps=1, batch_size=2, seq_len=16, period=2, compile_backend="eager", compile_layers=None,
    compile_steps=3, ratchet_steps=300, trainer_steps=2, memory_preset="tiny", memory_seq_len=16,
    projector_shape=(64, 172), projector_rank=16, throughput_presets=("tiny",), throughput_batch_size=2,
    throughput_steps=4, infer_preset="tiny", infer_batch_size=2, infer_seq_lens=(16,), infer_iters=1,
    probe_sequences=4, ddp_steps=2, ddp_processes=2, model_overrides={"num_layers": 1},
    infer_model_overrides={"num_layers": 1},
)


def config_for(options: dict[str, Any]) -> GpuCheckConfig:
    """The config of `rankscope bench gpu` from its options (None: not given); with device cpu,
    CPU_SETTINGS replace the GPU defaults."""
    given = {k: v for k, v in options.items() if v is not None}
    fields = [f.name for f in dataclasses.fields(GpuCheckConfig)]
    foreign = [k for k in given if k not in fields]
    if foreign:
        raise ConfigError(f"bench gpu has no setting {foreign[0]!r}{did_you_mean(foreign[0], fields)}")
    base = dict(CPU_SETTINGS) if given.get("device") == "cpu" else {}
    return GpuCheckConfig(**{**base, **given})
