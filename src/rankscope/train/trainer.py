"""The training loop: one loop for every method, read top to bottom.

Runs differ only in what the method contributes (its parameterization, optimizer, lr multiplier
and periodic work); the loop itself never asks which method it is running.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankscope.config import RunConfig
from rankscope.data import TrainStream, check_vocab, prepare_data
from rankscope.data.prepare import resolve_cache_dir
from rankscope.errors import ConfigError, NonFiniteLossError  # noqa: F401 - NonFiniteLossError re-exported
from rankscope.methods.memory_accounting import account_memory
from rankscope.models import token_losses
from rankscope.optim.roles import group_record
from rankscope.train import checkpoint as ckpt
from rankscope.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from rankscope.train.dynamics import DynamicsMonitor
from rankscope.train.preemption import RunPreempted, stop_requested
from rankscope.train.run_dir import normalized_config, open_run_dir
from rankscope.train.setup import (
    autocast_context,
    build_run_model,
    build_run_optimizer,
    check_method_settings,
    evaluate_loss,
    resolve_device,
    resolve_model_config,
    resolve_optim,
)
from rankscope.train.sidefiles import (
    INITIAL_EVAL_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    append_metrics,
    read_json,
    trim_metrics,
    write_json,
)
from rankscope.train.step_progress import ProgressLog

log = logging.getLogger("rankscope.train")


def _checkpoint_steps(cfg: RunConfig) -> set[int]:
    steps = set(cfg.train.checkpoint_steps)
    every = cfg.train.checkpoint_every
    if every:
        steps.update(range(every, cfg.train.steps + 1, every))
    steps.add(cfg.train.steps)  # the final model is always kept
    return steps


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def train(cfg: RunConfig, run_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Train (or resume, or recognise as finished) the run in `run_dir`; returns its summary."""
    run_dir = Path(run_dir)
    device = resolve_device(cfg.train.device)
    resolve_cache_dir(cfg.data)  # a cache path that cannot work fails before the run folder is touched
    check_method_settings(cfg)  # and so do bad method settings
    dist_info = init_distributed(device.type)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    try:
        # Rank 0 checks, locks and prepares the run folder (held until training ends); the other
        # ranks wait for it at the barrier after their own setup.
        with open_run_dir(cfg, run_dir, overwrite) if dist_info.is_main else nullcontext():
            return _train(cfg, run_dir, device, dist_info)
    finally:
        shutdown(dist_info)


def _train(cfg: RunConfig, run_dir: Path, device: torch.device, dist_info: DistInfo) -> dict[str, Any]:
    t = cfg.train
    if t.batch_size % dist_info.world_size:
        raise ConfigError(
            f"train.batch_size {t.batch_size} must be divisible by the number of processes ({dist_info.world_size})"
        )
    local_batch = t.batch_size // dist_info.world_size
    micro = t.micro_batch_size or local_batch
    if local_batch % micro:
        raise ConfigError(f"per-process batch {local_batch} is not a multiple of train.micro_batch_size {micro}")

    # -- data, model, method, optimizer ----------------------------------------------------
    data = prepare_data(cfg.data)
    model_cfg = resolve_model_config(cfg, data.vocab_size)
    check_vocab(data, model_cfg.vocab_size)
    model, method = build_run_model(cfg, model_cfg)
    if t.precision == "bf16-pure":
        model.to(torch.bfloat16)
    model.to(device)
    optim_settings = resolve_optim(cfg, type(method))
    optimizer = build_run_optimizer(method, model, optim_settings)
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    # Each group's effective lr and weight decay and the roles it holds (embeddings, head, norms,
    # the method's blocks): recorded in metrics.jsonl, every checkpoint and summary.json.
    param_groups = group_record(model, optimizer)
    stream = TrainStream(data.train, seed=t.seed, batch_size=t.batch_size, rank=dist_info.rank, world_size=dist_info.world_size)

    barrier(dist_info)

    # -- resume ------------------------------------------------------------------------------
    summary_path = run_dir / SUMMARY_FILE
    checkpoint_steps = _checkpoint_steps(cfg)
    start_step = 0
    existing = ckpt.list_checkpoints(run_dir, include_preemption=True)
    if existing and existing[-1].step >= t.steps and summary_path.is_file():
        log.info("run %s is already complete (step %d)", run_dir, existing[-1].step)
        return read_json(summary_path, "delete it and re-run")  # checked by open_run_dir
    latest = ckpt.latest_intact_checkpoint(run_dir, include_preemption=True) if existing else None
    if existing and latest is None:
        log.warning("no intact checkpoint in %s; starting from step 0", run_dir)
    if latest is not None:
        model.load_state_dict(ckpt.load_model_state(latest.path))
        state = ckpt.load_training_state(latest.path)
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["data"])
        method.load_state_dict(state["method"])
        _set_rng_state(state["rng"])
        start_step = latest.step
        if state.get("after_step_pending", False):
            # The checkpoint was written between the update and the method's periodic work.
            method.after_step(start_step, model, optimizer)
        if dist_info.is_main:
            log.info("resuming %s from step %d", run_dir, start_step)

    train_model: nn.Module = model
    if dist_info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward_model = torch.compile(train_model) if t.compile else train_model

    metrics_path = run_dir / METRICS_FILE
    initial_path = run_dir / INITIAL_EVAL_FILE
    initial = read_json(initial_path, "delete it") if (start_step > 0 and initial_path.is_file()) else None
    if dist_info.is_main:
        # Lines past the checkpoint we resume from go (so the log has each step once); a fresh
        # start logs step 0 again, so it keeps none.
        trim_metrics(metrics_path, start_step if start_step > 0 else -1)
    writer = _tensorboard(run_dir) if (t.tensorboard and dist_info.is_main) else None
    dynamics = DynamicsMonitor(model, optimizer, t, writer=writer, enabled=dist_info.is_main, seed=t.seed)
    params_total = sum(p.numel() for p in model.parameters())
    params_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def evaluate() -> dict[str, float]:
        return evaluate_loss(model, data.val, t.eval_batch_size, device, t.precision)

    def meta_for(step: int, val: dict | None) -> dict[str, Any]:
        return {
            "method": cfg.method.name, "preset": cfg.model.preset, "seed": t.seed,
            "tokens": step * t.batch_size * cfg.data.seq_len, "model_config": vars(model_cfg).copy(),
            "data_fingerprint": data.fingerprint, "val_loss": None if val is None else val["loss"],
            "config": normalized_config(cfg),  # a resume must run under the same config
            "param_groups": param_groups,
        }

    def save(step: int, val: dict | None, after_step_pending: bool, preemption: bool = False) -> None:
        if dist_info.is_main:
            training_state = {
                "optimizer": optimizer.state_dict(), "data": stream.state_dict(),
                "method": method.state_dict(), "rng": _rng_state(), "step": step,
                "after_step_pending": after_step_pending,
            }
            meta = {**meta_for(step, val), **({"preemption": True} if preemption else {})}
            ckpt.save_checkpoint(run_dir, step, model.state_dict(), training_state, meta)
            ckpt.prune_preemption_checkpoints(run_dir, before=step)
            ckpt.prune_checkpoints(run_dir, t.keep_last_checkpoints, protect=set(t.checkpoint_steps))
        barrier(dist_info)

    initial_val = None
    if start_step == 0:
        initial_val = evaluate()
        if dist_info.is_main:
            log.info("step 0: val loss %.4f, ppl %.2f", initial_val["loss"], initial_val["ppl"])
            append_metrics(metrics_path, {"step": 0, "tokens": 0, "val_loss": initial_val["loss"], "val_ppl": initial_val["ppl"],
                                          "param_groups": param_groups})
            write_json(initial_path, initial_val)
        initial = initial_val

    # -- one step, in named parts -----------------------------------------------------------------
    tokens_per_step = t.batch_size * cfg.data.seq_len
    skipped = 0

    def set_lrs(update: int) -> None:
        multiplier = method.lr_multiplier(update, optim_settings)  # 1-based update index
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * multiplier

    def forward_backward(batch: torch.Tensor) -> torch.Tensor:
        """The step's mean loss over its micro-batches (and processes); gradients accumulated."""
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        n_micro = batch.shape[0] // micro
        for index in range(n_micro):
            micro_batch = batch[index * micro : (index + 1) * micro]
            # Gradients are synchronised only on the last micro-batch of the step.
            sync = nullcontext() if (index == n_micro - 1 or not dist_info.enabled) else train_model.no_sync()
            with sync, autocast_context(device, t.precision):
                loss = token_losses(forward_model, micro_batch).mean()
                (loss / n_micro).backward()
            loss_sum += loss.detach().double()
        return all_reduce_sum(loss_sum / n_micro, dist_info) / dist_info.world_size

    def clip_gradients() -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad],
            optim_settings.grad_clip if optim_settings.grad_clip > 0 else float("inf"),
        )

    def update_or_skip(update: int, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Apply the update when loss and gradients are finite; otherwise stop or skip (train.nonfinite)."""
        nonlocal skipped
        if bool(torch.isfinite(step_loss)) and bool(torch.isfinite(grad_norm)):
            method.before_update(update, model, optimizer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return True
        last_good = ckpt.list_checkpoints(run_dir)
        where = f"step_{last_good[-1].step:06d}" if last_good else "none yet"
        if t.nonfinite == "stop":
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {update} (loss {float(step_loss):.4g}); "
                f"stopped without saving it (last good checkpoint: {where}); lower optim.lr or set train.nonfinite=skip"
            )
        skipped += 1
        optimizer.zero_grad(set_to_none=True)
        log.warning("step %d: non-finite loss or gradient, step skipped (%d so far)", update, skipped)
        return False

    def log_step(done: int, record: dict[str, Any]) -> None:
        if dist_info.is_main and (done % t.log_every == 0 or "val_loss" in record or done == t.steps
                                  or "dynamics" in record or "spike" in record):
            append_metrics(metrics_path, record)
            if writer is not None:
                for key in ("loss", "lr", "grad_norm", "val_loss"):
                    if key in record:
                        writer.add_scalar(f"train/{key}", record[key], done)

    def checkpoint_then_periodic_work(done: int, applied: bool, val: dict | None) -> None:
        if done in checkpoint_steps:
            save(done, val, after_step_pending=applied)
        if applied:
            # After the checkpoint, so it holds what the update produced (ReLoRA's adapters
            # before their merge, as the official code saves them); resume replays it.
            method.after_step(done, model, optimizer)

    def stop_if_requested(done: int, val: dict | None) -> None:
        if done < t.steps and stop_requested(dist_info, device):  # preemption: see train/preemption.py
            if done not in checkpoint_steps:
                save(done, val, after_step_pending=False, preemption=True)
            raise RunPreempted(run_dir, done)

    # -- the loop ----------------------------------------------------------------------------
    started = time.perf_counter()
    train_time = 0.0
    last_val: dict | None = None
    progress = ProgressLog(total=t.steps, start=start_step, enabled=dist_info.is_main, log_every=t.log_every)
    model.train()
    with progress:
        for step in range(start_step, t.steps):
            done = step + 1
            step_start = time.perf_counter()
            set_lrs(done)
            step_loss = forward_backward(stream.next_batch().to(device))
            dynamics.before_update(done, step_loss)
            grad_norm = clip_gradients()
            applied = update_or_skip(done, step_loss, grad_norm)
            measured = dynamics.after_update(done, applied=applied)  # its cost counts in step_time
            step_time = time.perf_counter() - step_start
            train_time += step_time
            record: dict[str, Any] = {
                "step": done, "tokens": done * tokens_per_step, "loss": float(step_loss),
                "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm), "step_time": step_time,
                **measured,
            }
            if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
                last_val = evaluate()
                record.update(val_loss=last_val["loss"], val_ppl=last_val["ppl"])
            log_step(done, record)
            progress.update(done, record, tokens_per_step / step_time)
            checkpoint_then_periodic_work(done, applied, last_val)
            stop_if_requested(done, last_val)

    wall_time = time.perf_counter() - started
    final_val = last_val if last_val is not None else evaluate()
    if writer is not None:
        writer.close()
    summary: dict[str, Any] = {
        "method": cfg.method.name, "preset": cfg.model.preset, "seed": t.seed,
        "steps": t.steps, "tokens": t.steps * tokens_per_step,
        "val_loss": final_val["loss"], "val_ppl": final_val["ppl"],
        "val_loss_literature_protocol": final_val["literature_loss"], "val_tokens": final_val["tokens"],
        "params": params_total, "trainable_params": params_trainable,
        "wall_time": wall_time, "train_time": train_time,
        "tokens_per_sec": (t.steps - start_step) * tokens_per_step / train_time if train_time > 0 else None,
        "skipped_steps": skipped, "resumed_from": start_step, "world_size": dist_info.world_size,
        "device": str(device), "memory": account_memory(model, optimizer, cfg.model.preset),
        "param_groups": param_groups,
    }
    if initial is not None:
        summary.update(initial_val_loss=initial["loss"], initial_val_ppl=initial["ppl"])
    if dist_info.is_main:
        write_json(summary_path, summary)
    barrier(dist_info)
    return summary


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install 'rankscope[tensorboard]'") from exc
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
