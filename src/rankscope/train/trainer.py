"""The training loop: one loop for every method, read top to bottom.

Runs differ only in what the method contributes (its parameterization, optimizer, lr multiplier
and periodic work); the loop itself never asks which method it is running.
"""

from __future__ import annotations

import logging
import math
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
from rankscope.optim.sharded import full
from rankscope.train import checkpoint as ckpt
from rankscope.train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    data_parallel,
    init_distributed,
    rank_stream_seed,
    separate_rank_streams,
    share_optimizer_work,
    shutdown,
)
from rankscope.train.dynamics import DynamicsMonitor
from rankscope.train.preemption import EvaluationStopped, RunPreempted, stop_agreed, stop_vote
from rankscope.train.run_dir import normalized_config, open_run_dir
from rankscope.train.setup import (
    autocast_context,
    build_run_optimizer,
    build_training_model,
    check_method_settings,
    evaluate_loss,
    find_resume_checkpoint,
    float32_matmul_precision,
    resolve_device,
    resolve_model_config,
    resolve_optim,
)
from rankscope.train.sharded_checkpoint import is_sharded_checkpoint, load_sharded_checkpoint, save_sharded_checkpoint
from rankscope.train.sharding import no_gradient_sync, shard_model, uses_fsdp
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


def train(cfg: RunConfig, run_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Train (or resume, or recognise as finished) the run in `run_dir`; returns its summary."""
    run_dir = Path(run_dir)
    device = resolve_device(cfg.train.device)
    resolve_cache_dir(cfg.data)  # a cache path that cannot work fails before the run folder is touched
    check_method_settings(cfg)  # and so do bad method settings
    dist_info = init_distributed(device.type, cfg.train.dist_timeout_min)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    try:
        # Rank 0 checks, locks and prepares the run folder (held until training ends); the other
        # ranks wait for it at a barrier once their data is ready, before they read the folder.
        with (open_run_dir(cfg, run_dir, overwrite) if dist_info.is_main else nullcontext(),
              float32_matmul_precision(device, cfg.train.tf32)):
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

    # -- data ----------------------------------------------------------------------------------
    data = prepare_data(cfg.data)
    model_cfg = resolve_model_config(cfg, data.vocab_size)
    check_vocab(data, model_cfg.vocab_size)
    barrier(dist_info)  # rank 0 has prepared the run folder: from here every rank may read it

    # -- the checkpoint to resume from, known before the model is built (a resumed model is built
    # without an init, which the checkpoint would overwrite) --------------------------------------
    summary_path = run_dir / SUMMARY_FILE
    checkpoint_steps = _checkpoint_steps(cfg)
    start_step = 0
    existing = ckpt.list_checkpoints(run_dir, include_preemption=True)
    if existing and existing[-1].step >= t.steps and summary_path.is_file():
        log.info("run %s is already complete (step %d)", run_dir, existing[-1].step)
        return read_json(summary_path, "delete it and re-run")  # checked by open_run_dir
    latest = find_resume_checkpoint(run_dir, dist_info) if existing else None  # hashed by rank 0 only
    if existing and latest is None:
        log.warning("no intact checkpoint in %s; starting from step 0", run_dir)

    # -- model, method, optimizer ---------------------------------------------------------------
    model, method = build_training_model(cfg, model_cfg, device, resuming=latest is not None)
    separate_rank_streams(t.seed, dist_info.rank)
    sharded = uses_fsdp(cfg) and dist_info.enabled  # FSDP2: rows of every tensor per rank (train/sharding.py)
    if sharded:
        shard_model(model, device, dist_info.world_size, t.precision)  # before the optimizer sees the parameters
    optim_settings = resolve_optim(cfg, type(method))
    optimizer = build_run_optimizer(method, model, optim_settings)
    if dist_info.enabled and not sharded:
        share_optimizer_work(optimizer)  # replicas with identical gradients: each refresh SVD on one rank
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    # Each group's effective lr and weight decay and the roles it holds (embeddings, head, norms,
    # the method's blocks): recorded in metrics.jsonl, every checkpoint and summary.json.
    param_groups = group_record(model, optimizer)
    stream = TrainStream(data.train, seed=t.seed, batch_size=t.batch_size, rank=dist_info.rank, world_size=dist_info.world_size)

    # -- resume ------------------------------------------------------------------------------
    if latest is not None:
        if is_sharded_checkpoint(latest.meta):  # any world size, sharded or not
            state = load_sharded_checkpoint(latest.path, model, optimizer, verify=dist_info.is_main)
        else:
            model.load_state_dict(ckpt.load_model_state(latest.path, device=device, verify=dist_info.is_main))
            state = ckpt.load_training_state(latest.path, verify=dist_info.is_main)
            optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["data"])
        method.load_state_dict(state["method"])
        ckpt.restore_rng_state(state["rng"], dist_info.rank, dist_info.world_size, device,
                               fresh_seed=rank_stream_seed(t.seed, dist_info.rank, latest.step))
        start_step = latest.step
        if state.get("after_step_pending", False):
            # The checkpoint was written between the update and the method's periodic work.
            method.after_step(start_step, model, optimizer)
        if dist_info.is_main:
            log.info("resuming %s from step %d", run_dir, start_step)

    # What the step runs: DDP (over the parameters trainable now) around the model, compiled if
    # asked. A method may change which parameters train (ReLoRA's warm start ends by freezing W0);
    # a DDP built over the old set then waits for gradients that never come, so after each
    # step's periodic work the model is wrapped again when the set changed.
    def wrap_for_training() -> tuple[nn.Module, nn.Module, tuple[bool, ...]]:
        wrapped = data_parallel(model, device) if dist_info.enabled and not sharded else model
        return wrapped, torch.compile(wrapped) if t.compile else wrapped, trainable_flags()

    def trainable_flags() -> tuple[bool, ...]:
        return tuple(p.requires_grad for p in model.parameters())

    train_model, forward_model, wrapped_flags = wrap_for_training()

    metrics_path = run_dir / METRICS_FILE
    initial_path = run_dir / INITIAL_EVAL_FILE
    initial = read_json(initial_path, "delete it") if (start_step > 0 and initial_path.is_file()) else None
    if dist_info.is_main:
        # Lines past the checkpoint we resume from go (so the log has each step once); a fresh
        # start logs step 0 again, so it keeps none.
        trim_metrics(metrics_path, start_step if start_step > 0 else -1)
    writer = _tensorboard(run_dir) if (t.tensorboard and dist_info.is_main) else None
    if sharded and t.dynamics_every and dist_info.is_main:
        log.warning("train.dynamics_every: the update spectra are not measured under train.parallel=fsdp (rank 0 "
                    "holds only its rows of each matrix)")
    dynamics = DynamicsMonitor(model, optimizer, t, writer=writer, enabled=dist_info.is_main and not sharded, seed=t.seed)
    params_total = sum(p.numel() for p in model.parameters())
    params_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def evaluate() -> dict[str, float] | None:
        """The val loss (the val set shared out among the ranks); None when a stop request
        (preemption) cut the validation short."""
        try:
            return evaluate_loss(model, data.val, t.eval_batch_size, device, t.precision,
                                 dist_info=dist_info, stoppable=True)
        except EvaluationStopped:
            return None

    def meta_for(step: int, val: dict | None) -> dict[str, Any]:
        return {
            "method": cfg.method.name, "preset": cfg.model.preset, "seed": t.seed,
            "tokens": step * t.batch_size * cfg.data.seq_len, "model_config": vars(model_cfg).copy(),
            "data_fingerprint": data.fingerprint, "val_loss": None if val is None else val["loss"],
            "config": normalized_config(cfg),  # a resume must run under the same config
            "param_groups": param_groups,
        }

    def save(step: int, val: dict | None, after_step_pending: bool, preemption: bool = False) -> None:
        # Every rank's random state (each draws its own dropout masks), collected by rank 0.
        rng_states = all_gather_objects(ckpt.capture_rng_state(device), dist_info)
        training_state = {
            "data": stream.state_dict(), "method": method.state_dict(), "rng": {"ranks": rng_states}, "step": step,
            "after_step_pending": after_step_pending,
        }
        meta = {**meta_for(step, val), **({"preemption": True} if preemption else {})}
        if uses_fsdp(cfg):  # every rank writes its rows (torch.distributed.checkpoint)
            save_sharded_checkpoint(run_dir, step, model, optimizer, training_state, meta, dist_info)
        elif dist_info.is_main:
            training_state["optimizer"] = optimizer.state_dict()
            ckpt.save_checkpoint(run_dir, step, model.state_dict(), training_state, meta)
        if dist_info.is_main:
            ckpt.prune_preemption_checkpoints(run_dir, before=step)
            ckpt.prune_checkpoints(run_dir, t.keep_last_checkpoints, protect=set(t.checkpoint_steps))
        barrier(dist_info)

    initial_val = None
    if start_step == 0:
        initial_val = evaluate()
        if initial_val is None:
            raise RunPreempted(run_dir, 0)  # nothing trained yet: the next attempt starts afresh
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

    def to_device(batch: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda":
            # A plain copy from pageable memory waits for the GPU to finish the previous step (a
            # host sync); from pinned memory it is queued behind it.
            return batch.pin_memory().to(device, non_blocking=True)
        return batch.to(device)

    def forward_backward(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's mean loss over its micro-batches and processes, and the number of processes
        that ask to stop (their votes ride on the loss's all-reduce); gradients accumulated.
        Both stay on the device."""
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        n_micro = batch.shape[0] // micro
        for index in range(n_micro):
            micro_batch = batch[index * micro : (index + 1) * micro]
            # Gradients are synchronised only on the last micro-batch of the step.
            sync = nullcontext() if (index == n_micro - 1 or not dist_info.enabled) else no_gradient_sync(train_model)
            with sync, autocast_context(device, t.precision):
                loss = token_losses(forward_model, micro_batch).mean()
                (loss / n_micro).backward()
            loss_sum += loss.detach().double()
        # torch.full fills on the device; torch.tensor(vote, device=...) would copy and sync.
        vote = torch.full((), stop_vote(), device=device, dtype=torch.float64)
        reduced = all_reduce_sum(torch.stack([loss_sum / n_micro, vote]), dist_info)
        return reduced[0] / dist_info.world_size, reduced[1]

    def trainable_parameters() -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def gradient_norm() -> torch.Tensor:
        """The total norm of the gradients before clipping (on the device)."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in trainable_parameters() if p.grad is not None])
        return full(norm)  # under FSDP a replicated DTensor: a plain tensor like the others

    def clip_gradients(norm: torch.Tensor) -> None:
        # clip_grad_norm_ in two halves (it is get_total_norm, then this), so that the norm is
        # read in the step's one host sync and DynamicsMonitor sees the gradients before clipping.
        torch.nn.utils.clip_grads_with_norm_(
            trainable_parameters(), optim_settings.grad_clip if optim_settings.grad_clip > 0 else float("inf"), norm
        )

    def update_or_skip(update: int, step_loss: float, grad_norm: float) -> bool:
        """Apply the update when loss and gradients are finite; otherwise stop or skip (train.nonfinite)."""
        nonlocal skipped
        if math.isfinite(step_loss) and math.isfinite(grad_norm):
            method.before_update(update, model, optimizer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return True
        last_good = ckpt.list_checkpoints(run_dir)
        where = f"step_{last_good[-1].step:06d}" if last_good else "none yet"
        if t.nonfinite == "stop":
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {update} (loss {step_loss:.4g}); "
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

    def wrap_again_if_trainable_changed() -> None:
        nonlocal train_model, forward_model, wrapped_flags
        if dist_info.enabled and trainable_flags() != wrapped_flags:
            train_model = forward_model = None  # the old DDP (and its gradient hooks) goes first
            train_model, forward_model, wrapped_flags = wrap_for_training()

    def stop_if_requested(done: int, val: dict | None, stop_votes: float, validation_cut_short: bool) -> None:
        """Preemption (train/preemption.py): checkpoint this step and stop, unless it is the last."""
        if done < t.steps and (validation_cut_short or stop_agreed(dist_info, stop_votes)):
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
            loss_on_device, votes_on_device = forward_backward(to_device(stream.next_batch()))
            norm_on_device = gradient_norm()
            # The step's one host sync: everything the host decides on, read together.
            step_loss, grad_norm, stop_votes = torch.stack(
                [loss_on_device, norm_on_device.double(), votes_on_device]).tolist()
            dynamics.before_update(done, step_loss)
            clip_gradients(norm_on_device)
            applied = update_or_skip(done, step_loss, grad_norm)
            measured = dynamics.after_update(done, applied=applied)  # its cost counts in step_time
            step_time = time.perf_counter() - step_start
            train_time += step_time
            record: dict[str, Any] = {
                "step": done, "tokens": done * tokens_per_step, "loss": step_loss,
                "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm, "step_time": step_time,
                **measured,
            }
            validation_cut_short = False
            if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
                last_val = evaluate()
                validation_cut_short = last_val is None
                if last_val is not None:
                    record.update(val_loss=last_val["loss"], val_ppl=last_val["ppl"])
            log_step(done, record)
            progress.update(done, record, tokens_per_step / step_time)
            checkpoint_then_periodic_work(done, applied, last_val)
            wrap_again_if_trainable_changed()
            stop_if_requested(done, last_val, stop_votes, validation_cut_short)

    wall_time = time.perf_counter() - started
    final_val = last_val if last_val is not None else evaluate()
    if final_val is None:
        # A stop cut the final validation short; the final checkpoint is written, and training
        # the run again validates it and writes the summary.
        raise RunPreempted(run_dir, t.steps)
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
        "device": str(device), "float32_matmul_precision": torch.get_float32_matmul_precision(), "memory": account_memory(model, optimizer, cfg.model.preset),
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
