"""Building the pieces of a run from its config, shared by training, analysis, eval and export."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from rankscope import methods
from rankscope.config import RunConfig, check_device_name, config_from_dict, load_yaml
from rankscope.errors import CheckpointError, ConfigError
from rankscope.methods.base import Method, ResolvedOptim, check_param_groups
from rankscope.methods.tuned import optim_defaults_for
from rankscope.models import LlamaConfig, build_model, get_preset, token_losses
from rankscope.models.host_random import HostRandomInit
from rankscope.optim.roles import ROLE_FIELDS, apply_role_settings, role_settings
from rankscope.train import checkpoint as ckpt
from rankscope.train.distributed import DistInfo, all_gather_objects, all_reduce_sum
from rankscope.train.preemption import EvaluationStopped, stop_requested
from rankscope.train.sharding import check_fsdp_settings, is_sharded_model

log = logging.getLogger("rankscope.train")

def resolve_device(name: str, key: str = "train.device") -> torch.device:
    check_device_name(name, key)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name!r} but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{key}={name!r} but this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}={name!r} but MPS is not available here; use --device cpu")
    return device


def resolve_model_config(cfg: RunConfig, tokenizer_vocab: int) -> LlamaConfig:
    """The preset, its overrides, and a vocabulary that fits the tokenizer.

    Without an explicit `vocab_size` override the embedding is sized to the tokenizer, rounded up
    to a multiple of 64 (tensor-core friendly); an explicit size must hold every tokenizer id.
    """
    model_cfg = get_preset(cfg.model.preset)
    overrides = dict(cfg.model.overrides)
    if "vocab_size" not in overrides:
        overrides["vocab_size"] = int(math.ceil(tokenizer_vocab / 64) * 64)
    model_cfg = dataclasses.replace(model_cfg, **overrides)
    if model_cfg.hidden_size % model_cfg.num_heads:
        raise ConfigError(
            f"model hidden_size {model_cfg.hidden_size} is not divisible by num_heads {model_cfg.num_heads}"
        )
    return model_cfg


def resolve_optim(cfg: RunConfig, method_cls: type[Method]) -> ResolvedOptim:
    defaults = optim_defaults_for(method_cls, cfg.model.preset)
    o = cfg.optim

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    steps = cfg.train.steps
    warmup = o.warmup_steps if o.warmup_steps is not None else int(round(o.warmup_ratio * steps))
    roles = role_settings(SimpleNamespace(**{name: pick(getattr(o, name), getattr(defaults, name))
                                             for name in ROLE_FIELDS}))
    return ResolvedOptim(
        lr=pick(o.lr, defaults.lr),
        weight_decay=pick(o.weight_decay, defaults.weight_decay),
        weight_decay_scope=pick(o.weight_decay_scope, defaults.weight_decay_scope),
        betas=(o.beta1, o.beta2),
        eps=pick(o.eps, defaults.eps),
        grad_clip=pick(o.grad_clip, defaults.grad_clip),
        total_steps=steps,
        warmup_steps=min(warmup, steps),
        min_lr_ratio=o.min_lr_ratio,
        roles=roles,
        state_dtype=o.state_dtype,
    )


def build_run_optimizer(method: Method, model: nn.Module, optim: ResolvedOptim) -> torch.optim.Optimizer:
    """The method's optimizer with the per-role settings applied (the one place they are) and
    every trainable parameter checked to sit in exactly one group."""
    optimizer = method.build_optimizer(model, optim)
    apply_role_settings(model, optimizer, optim.roles, method=method.name)
    check_param_groups(model, optimizer)
    return optimizer


def build_method(cfg: RunConfig, model_cfg: LlamaConfig) -> Method:
    method_cls = methods.get(cfg.method.name)
    method = method_cls(cfg.method.settings, model_cfg, cfg.model.preset)
    method.validate()
    return method


def check_method_settings(cfg: RunConfig) -> None:
    """The method's own checks (rank vs layer shapes, ...) on the preset's shapes, before any work.

    The vocabulary is not known before the data is prepared, and no method's checks depend on it.
    Under train.parallel=fsdp a method that cannot train sharded is refused here, by name.
    """
    method = build_method(cfg, dataclasses.replace(get_preset(cfg.model.preset), **cfg.model.overrides))
    check_fsdp_settings(cfg, method)


def build_run_model(
    cfg: RunConfig, model_cfg: LlamaConfig, seed: int | None = None, device: str | torch.device | None = None
) -> tuple[nn.Module, Method]:
    """The initial model of a run: dense LLaMA, then the method's parameterization, seeded.

    Without `device` (or on the CPU) it is built on the CPU, whose init the golden runs fix bit
    for bit. On a GPU it is built there (`torch.device` as the default device): no fp32 copy of
    the model in host memory, and the init's linear algebra (Spectron's SVD of every targeted
    weight) runs on the GPU. Its random draws are still made on the CPU, one tensor at a time
    (`HostRandomInit`), so the weights are a CPU build's, whatever the GPU (values computed from
    them there, such as Spectron's factors, carry the GPU's rounding). On the meta device
    nothing is initialised (no draw, no SVD): a skeleton for a checkpoint to fill (`build_skeleton`).
    """
    method = build_method(cfg, model_cfg)
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    target = None if device is None else torch.device(device)
    elsewhere = target is not None and target.type != "cpu"
    with target if elsewhere else contextlib.nullcontext(), HostRandomInit() if elsewhere else contextlib.nullcontext():
        model = build_model(model_cfg)
        model = method.parameterize(model)
    return model, method


def build_skeleton(
    cfg: RunConfig, model_cfg: LlamaConfig, device: str | torch.device, dtype: torch.dtype | None = None
) -> tuple[nn.Module, Method]:
    """A run's model with uninitialised storage on `device` (in `dtype`), for a checkpoint to fill
    with `load_state_dict`: built on the meta device, so no init runs (Spectron's SVDs included),
    then given memory with `to_empty`. What a checkpoint does not hold is derived, not drawn (the
    RoPE tables, recomputed when the model is materialised)."""
    model, method = build_run_model(cfg, model_cfg, device="meta")
    if dtype is not None:
        model.to(dtype)
    model.to_empty(device=device)
    return model, method


def build_training_model(
    cfg: RunConfig, model_cfg: LlamaConfig, device: torch.device, resuming: bool
) -> tuple[nn.Module, Method]:
    """The model the trainer trains: on `device`, in bf16 under train.precision=bf16-pure, with
    train.activation_checkpointing applied. A run that resumes gets a skeleton, which the
    checkpoint fills (nothing is initialised only to be overwritten); a new run is initialised
    as `build_run_model` does, on the device itself when that is a GPU."""
    t = cfg.train
    dtype = torch.bfloat16 if t.precision == "bf16-pure" else None
    if resuming:
        model, method = build_skeleton(cfg, model_cfg, device, dtype)
    else:
        model, method = build_run_model(cfg, model_cfg, device=device)
        if dtype is not None:
            model.to(dtype)  # after the init: bf16-pure starts from the rounded fp32 init
        model.to(device)
    if not hasattr(model, "activation_checkpointing"):
        raise ConfigError(f"train.activation_checkpointing: the model ({type(model).__name__}) has no such switch")
    model.activation_checkpointing = t.activation_checkpointing
    return model, method


def find_resume_checkpoint(run_dir: str | Path, dist_info: DistInfo) -> ckpt.CheckpointInfo | None:
    """The newest intact checkpoint (preemption ones included) to resume from, or None.

    Rank 0 verifies the files against their hashes, skipping damaged ones; the other ranks take
    the step it chose rather than each reading every file from the shared file system again
    (load them with `verify=False`)."""
    chosen = ckpt.latest_intact_checkpoint(run_dir, include_preemption=True) if dist_info.is_main else None
    step = all_gather_objects(None if chosen is None else chosen.step, dist_info)[0]
    if dist_info.is_main or step is None:
        return chosen
    for info in ckpt.list_checkpoints(run_dir, include_preemption=True):
        if info.step == step:
            return info
    raise CheckpointError(f"rank {dist_info.rank} cannot see the checkpoint of step {step} in {run_dir} that rank 0 "
                          "resumes from; every process must see the same run folder")


@contextlib.contextmanager
def float32_matmul_precision(device: torch.device, tf32: bool) -> Iterator[str]:
    """For a run on `device`: on CUDA with train.tf32, fp32 matmuls may use TensorFloat-32
    (torch's "high"; several times the fp32 throughput of a GPU's tensor cores, with a 10-bit
    mantissa inside the product), and "highest" (true fp32) without it. Elsewhere the setting is
    left alone: on a CPU "high" would also switch oneDNN's fp32 matmuls to TF32 where the CPU has
    it. Yields the precision in effect, for the run's summary; the previous one is restored after."""
    previous = torch.get_float32_matmul_precision()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield torch.get_float32_matmul_precision()
    finally:
        torch.set_float32_matmul_precision(previous)


@dataclass
class LoadedRun:
    model: nn.Module
    config: RunConfig
    model_config: LlamaConfig
    method: Method
    step: int
    checkpoint: Path


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The run's config: config.yaml, or (when that is missing or damaged) the one its newest
    checkpoint records."""
    path = Path(run_dir) / "config.yaml"
    try:
        if path.is_file():
            return config_from_dict(load_yaml(path))
        problem = ConfigError(f"{run_dir} is not a rankscope run (no config.yaml); train one with `rankscope train --out {run_dir}`")
    except ConfigError as exc:
        problem = exc
    recorded = [c.meta["config"] for c in ckpt.list_checkpoints(run_dir) if isinstance(c.meta.get("config"), dict)]
    if not recorded:
        raise problem
    log.warning("%s is missing or damaged; using the config recorded in the run's newest checkpoint", path)
    return config_from_dict(recorded[-1])


def load_run_model(run_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild a run's model (with its method's parameterization) and load a checkpoint into it.

    Without `step` the newest intact checkpoint is used (damaged newer ones are skipped with a
    warning that names them); a damaged checkpoint asked for by step is an error.
    """
    cfg = read_run_config(run_dir)
    available = ckpt.list_checkpoints(run_dir)
    if not available:
        raise CheckpointError(f"run {run_dir} has no complete checkpoint; train it (or let it reach a checkpoint step) first")
    if step is None:
        info = ckpt.latest_intact_checkpoint(run_dir)
        if info is None:
            raise CheckpointError(
                f"every checkpoint of run {run_dir} is damaged (see the warnings above); train it again with --overwrite"
            )
    else:
        matches = [c for c in available if c.step == step]
        if not matches:
            raise CheckpointError(
                f"run {run_dir} has no checkpoint at step {step}; available steps: {[c.step for c in available]}"
            )
        info = matches[0]
        ckpt.verify_checkpoint(info.path, "ask for another step (without one, the newest intact checkpoint is used)")
    model_cfg = LlamaConfig(**info.meta["model_config"])
    # A skeleton on the device: no init to throw away (for Spectron, no SVD per targeted weight),
    # and the weights go from the file to the device without a host copy of the model.
    model, method = build_skeleton(cfg, model_cfg, device)
    state = ckpt.load_model_state(info.path, device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {info.path} does not fit method {cfg.method.name!r}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.eval()
    return LoadedRun(model, cfg, model_cfg, method, info.step, info.path)


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16-autocast":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    sequences: torch.Tensor,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    dist_info: DistInfo | None = None,
    stoppable: bool = False,
) -> dict[str, float]:
    """Exact token-weighted mean next-token loss over `sequences`, and the literature's variant.

    The literature averaged per-batch mean losses (and divided by one batch too many); we report
    the exact token-weighted mean, plus the plain mean of batch means for comparison.

    Under DDP (`dist_info` of several processes) every rank must call this; batch i of the
    single-process loop goes to rank i mod world_size. The per-batch results are all-reduced into
    one table in which each entry has a single contributor (the other ranks add exact zeros) and
    folded in batch order, as one process folds them, so every rank returns the single-process
    numbers (bit for bit wherever the model gives a batch the same losses on every rank).

    `stoppable`: before every batch, check whether a stop was requested (train/preemption.py;
    under DDP the ranks agree through a vote) and raise EvaluationStopped, so that a preemption
    does not wait for a long validation to end.
    """
    dist_info = dist_info or DistInfo()
    n_batches = math.ceil(sequences.shape[0] / batch_size)
    # One row per batch: fp64 sum of its token losses, its token count, its fp64 mean. Filled on
    # the device and read once at the end (no host sync per batch).
    table = torch.zeros(n_batches, 3, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        # Every rank runs the same number of rounds, so the stop votes (collectives) pair up even
        # when the last round has fewer batches than ranks.
        for first in range(0, n_batches, dist_info.world_size):
            if stoppable and stop_requested(dist_info, device):
                raise EvaluationStopped
            index = first + dist_info.rank
            if index >= n_batches:
                if is_sharded_model(model):  # FSDP: every rank joins every forward's all-gathers
                    token_losses(model, sequences[:batch_size].to(device))
                continue
            batch = sequences[index * batch_size : (index + 1) * batch_size].to(device)
            with autocast_context(device, precision):
                losses = token_losses(model, batch)
            losses = losses.double()
            table[index, 0] = losses.sum()
            table[index, 1] = losses.numel()
            table[index, 2] = losses.mean()
    finally:
        model.train(was_training)
        if is_sharded_model(model):
            model.reshard()  # FSDP keeps the root's weights gathered after a forward without backward
    sums, counts, means = zip(*all_reduce_sum(table, dist_info).tolist()) if n_batches else ((), (), ())
    total = 0.0
    for batch_sum in sums:  # in batch order, as a single process adds them
        total += batch_sum
    count = int(sum(counts))
    loss = total / max(count, 1)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "tokens": count,
        "literature_loss": sum(means) / max(len(means), 1),
    }
