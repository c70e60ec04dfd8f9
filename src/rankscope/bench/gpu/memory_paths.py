"""The memory paths of the GPU check: what a dynamics measurement adds to a step's peak, and
one training step at 1B shapes without and with activation checkpointing, next to the memory
table's estimate."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from rankscope.bench.common import synchronize
from rankscope.bench.gpu.paths import (
    Context,
    free_device,
    method_run,
    peak_since,
    require_finite,
    run_config,
    start_peak,
)
from rankscope.errors import RankscopeError


def dynamics_path(ctx: Context, method: str) -> dict[str, Any]:
    """The trainer's dynamics monitor (train.dynamics_every=2) on the device: the peak allocation
    of a measured step's update window (clipping, optimizer step, periodic work, measurement)
    against a plain step's, as a multiple of the targeted weights' fp32 size: the factor that
    decides whether a dynamics step fits at 1B or 7B (#5 of the GPU audit: 3.3x under bf16-pure)."""
    from rankscope.bench.train import random_batches, train_step
    from rankscope.models import iter_target_linears
    from rankscope.train.dynamics import DynamicsMonitor

    config, device, precision, every = ctx.config, ctx.device, "bf16-pure", 2

    class WindowPeaks(DynamicsMonitor):
        """The monitor, with the peak allocation between its two calls recorded per step."""

        def before_update(self, step, loss):
            self.base = start_peak(device)
            super().before_update(step, loss)

        def after_update(self, step, applied=True):
            record = super().after_update(step, applied)
            self.peaks[step] = peak_since(device, self.base)
            self.records[step] = record
            return record

    cfg = run_config(config.preset, method, config.batch_size, config.seq_len, config.model_overrides,
                     train={"dynamics_every": every})
    run = method_run(cfg, device, precision, config.seed)
    monitor = WindowPeaks(run.model, run.optimizer, cfg.train, seed=config.seed)
    monitor.peaks, monitor.records = {}, {}
    batches = random_batches(run.model_config.vocab_size, config.batch_size, config.seq_len, 2, config.seed, device)
    for index in range(2 * every):  # steps 1..4: 2 and 4 measure; 3 (plain) and 4 compare, both steady
        loss = float(train_step(run, batches[index % 2], monitor)["loss"])
        require_finite([loss], f"{method} loss with dynamics on")
    measured = sorted(step for step, record in monitor.records.items() if "dynamics" in record)
    if measured != [every, 2 * every]:
        raise RankscopeError(f"dynamics_every={every}: measurements at steps {measured}, expected [{every}, {2 * every}]")
    rows = monitor.records[2 * every]["dynamics"]["matrices"].values()
    norms = [value for row in rows for value in row.values() if value is not None]
    if not norms:
        raise RankscopeError(f"{method}: the dynamics measurement holds no spectral norm")
    require_finite(norms, f"{method} measured spectral norms")
    targeted = sum(module.out_features * module.in_features * 4 if hasattr(module, "out_features")
                   else module.weight.numel() * 4 for _, _, _, module in iter_target_linears(run.model))
    plain, with_dynamics = monitor.peaks[2 * every - 1], monitor.peaks[2 * every]
    extra = with_dynamics - plain if plain is not None else None
    return {"preset": config.preset, "method": method, "precision": precision, "dynamics_every": every,
            "measured_steps": measured, "targeted_fp32_bytes": targeted, "plain_step_peak_bytes": plain,
            "measured_step_peak_bytes": with_dynamics, "extra_bytes": extra,
            "extra_over_targeted_fp32": extra / targeted if extra is not None else None}


# ---------------------------------------------------------------------------------------------
# memory at 1B, projector refresh


class SavedForBackward:
    """Bytes of the tensors autograd keeps for the backward pass (each storage once, parameters
    left out): the activation memory that activation checkpointing trades for recomputation."""

    def __init__(self, model: torch.nn.Module):
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self.skip and pointer not in self.seen:
            self.seen.add(pointer)
            self.bytes += storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def memory_path(ctx: Context, method: str) -> dict[str, Any]:
    """One bf16-pure training step (forward, backward, optimizer step) at micro-batch 1 of the
    memory preset built on the device, without and with train.activation_checkpointing: the peak
    allocation and the activations kept for backward. Checkpointing must keep fewer."""
    from rankscope import methods
    from rankscope.models import token_losses

    config, device, precision = ctx.config, ctx.device, "bf16-pure"
    seq_len, results = config.memory_seq_len, {}
    for checkpointing in (False, True):
        free_device(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        method_overrides = {}
        if "svd" in {f.name for f in dataclasses.fields(methods.get(method).Settings)}:
            # GaLore's first step refreshes every projector: randomized at 1B takes milliseconds
            # per matrix instead of a second, and the state it leaves has the same size.
            method_overrides["svd"] = "randomized"
        cfg = run_config(config.memory_preset, method, 1, seq_len, config.infer_model_overrides, method_overrides,
                         train={"activation_checkpointing": checkpointing})
        run = method_run(cfg, device, precision, config.seed, on_device=True)
        run.model.activation_checkpointing = checkpointing  # as the trainer sets it from the config
        tokens = torch.randint(0, run.model_config.vocab_size, (1, seq_len),
                               generator=torch.Generator().manual_seed(config.seed)).to(device)
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        saved = SavedForBackward(run.model)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            loss = token_losses(run.model, tokens).mean()
        loss.backward()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        require_finite([float(loss.detach())], f"{method} loss at {config.memory_preset}")
        results[checkpointing] = {
            "peak": torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None,
            "activations": saved.bytes, "params": sum(p.numel() for p in run.model.parameters()),
            "weights_and_state": sum(p.numel() * p.element_size() for p in run.model.parameters())
            + sum(t.numel() * t.element_size() for s in run.optimizer.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor)),
        }
        del run, loss, tokens
    plain, checkpointed = results[False], results[True]
    if checkpointed["activations"] >= plain["activations"]:
        raise RankscopeError(f"train.activation_checkpointing=true kept {checkpointed['activations']:,} bytes of "
                             f"activations for backward, not fewer than without it ({plain['activations']:,})")
    # The memory table's training estimate for the same model and step (`rankscope methods
    # --memory`), next to the measured peak: only where the preset is built as it is.
    estimate = None
    if not config.infer_model_overrides:
        from rankscope.methods.memory_table import training_estimate

        estimate = training_estimate(methods.get(method), config.memory_preset, micro_batch=1, seq_len=seq_len, gpus=1)
    return {"preset": config.memory_preset, "method": method, "precision": precision, "seq_len": seq_len,
            "micro_batch": 1, "total_params": plain["params"], "weights_and_state_bytes": plain["weights_and_state"],
            "peak_bytes": plain["peak"], "peak_bytes_checkpointed": checkpointed["peak"],
            "activation_bytes": plain["activations"], "activation_bytes_checkpointed": checkpointed["activations"],
            "estimate_bytes": estimate and estimate["training_ddp_bytes"],
            "estimate_bytes_checkpointed": estimate and estimate["training_ddp_checkpointed_bytes"]}
