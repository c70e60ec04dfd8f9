"""Building the pieces of a run from its config, shared by training, analysis, eval and export."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
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
from rankscope.optim.roles import ROLE_FIELDS, apply_role_settings, role_settings
from rankscope.train import checkpoint as ckpt

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
    """
    build_method(cfg, dataclasses.replace(get_preset(cfg.model.preset), **cfg.model.overrides))


def build_run_model(cfg: RunConfig, model_cfg: LlamaConfig, seed: int | None = None) -> tuple[nn.Module, Method]:
    """The initial model of a run: dense LLaMA, then the method's parameterization, seeded."""
    method = build_method(cfg, model_cfg)
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    model = build_model(model_cfg)
    model = method.parameterize(model)
    return model, method


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
    model, method = build_run_model(cfg, model_cfg)
    state = ckpt.load_model_state(info.path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {info.path} does not fit method {cfg.method.name!r}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.to(device)
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
) -> dict[str, float]:
    """Exact token-weighted mean next-token loss over `sequences`, and the literature's variant.

    The literature averaged per-batch mean losses (and divided by one batch too many); we report
    the exact token-weighted mean, plus the plain mean of batch means for comparison.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    batch_means = []
    for start in range(0, sequences.shape[0], batch_size):
        batch = sequences[start : start + batch_size].to(device)
        with autocast_context(device, precision):
            losses = token_losses(model, batch)
        total += losses.double().sum().cpu()
        count += losses.numel()
        batch_means.append(float(losses.double().mean()))
    model.train(was_training)
    loss = float(total / max(count, 1))
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "tokens": count,
        "literature_loss": float(sum(batch_means) / max(len(batch_means), 1)),
    }
