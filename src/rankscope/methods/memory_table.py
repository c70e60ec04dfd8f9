"""`rankscope methods --memory`: parameters and optimizer-state memory of every method at a preset.

Each method's own code builds its model and optimizer: the preset's model is parameterized by the
method, the method's optimizer is built, its state is materialised by one optimizer step that
cannot move any weight (lr = 0 in every group and all-zero gradients), then `account_memory`
counts the tensors. Two modes:

- shapes (default): everything lives on PyTorch's meta device, tensors with shapes and dtypes
  and no data, so any preset (7B included) takes seconds and no memory. The counts are exactly
  those of real tensors (tests/methods/test_memory.py compares both modes at small presets).
- measured (`--measured`): real tensors on the CPU, built one method after another (the peak is
  one model plus its optimizer, about 4.5 GB for full-rank 350M), with a progress line per
  method; the step's no-op is also checked (a checksum of the weights before and after).

GaLore / Fira projectors: the first step would take one SVD per targeted weight. Instead the
projector tensors are created, zero-filled, with exactly the shapes and dtype the optimizer's
SVD would give (`rankscope.optim.projector.projection_side`), and the step counter is set so that
the optimizer keeps them; sizes are identical to the SVD path (tests/methods/test_memory.py
checks it). Their values do not matter: the gradient is zero.

The `published` columns are LORO Table 1 (seeds/003; its baselines come from GaLore and SLTrain):
parameters in millions, estimated memory in GB = 1e9 bytes.

Training estimate (`training_memory_table`, printed after the table): what one GPU holds while a
run trains under train.precision=bf16-pure, from each method's own tensors built on the meta
device in bf16 with its optimizer in `optim.state_dtype`:
- weights (bf16, frozen ones included), gradients (bf16, every trainable tensor: rankscope has no
  per-layer weight update, so all gradients exist at once), optimizer state (its actual dtypes);
- DDP gradient buckets: none extra, since the trainer builds DDP with gradient_as_bucket_view=True
  (the gradients are the buckets; torch's default would add one more copy of the gradients);
- activations at the given micro-batch and sequence length: the bytes autograd keeps for the
  backward, counted by `saved_activation_bytes` on the method's model (attention as the flash
  kernels keep it); with activation checkpointing the retained block inputs plus one recomputed
  block. Backward temporaries, the CUDA context, allocator caches and fragmentation are not in it;
- FSDP over N GPUs (train.parallel=fsdp): weights, gradients and state divided by N, plus the
  working set FSDP2 gathers: the root unit's whole weights (embeddings, head, final norm: not
  resharded between forward and backward), two decoder layers' whole weights (the one running and
  the one prefetched) and one layer's whole gradients in fp32 (reduced in fp32). State / N is a
  lower bound for the GaLore family, whose right projectors and left-side moments stay whole on
  every rank (optim/galore.py, "Under FSDP").
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rankscope.errors import ConfigError
from rankscope.methods.base import Method, ResolvedOptim, check_param_groups
from rankscope.methods.memory_accounting import account_memory, saved_activation_bytes
from rankscope.models import build_model, get_preset

GB = 1e9

# LORO Table 1: (params in millions, estimated memory in GB) per preset and method.
PUBLISHED_LORO_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "60m": {"full": (58, 0.35), "lowrank": (43, 0.24), "lora": (58, 0.36), "relora": (58, 0.36),
            "galore": (58, 0.28), "sltrain": (44, 0.26), "loro": (43, 0.24)},
    "130m": {"full": (134, 0.81), "lowrank": (94, 0.57), "lora": (134, 0.84), "relora": (134, 0.84),
             "galore": (134, 0.61), "sltrain": (97, 0.60), "loro": (94, 0.57)},
    "350m": {"full": (368, 2.21), "lowrank": (185, 1.11), "lora": (368, 1.85), "relora": (368, 1.85),
             "galore": (368, 1.59), "sltrain": (194, 1.24), "loro": (185, 1.11)},
    "1b": {"full": (1339, 8.04), "lowrank": (609, 3.66), "lora": (1339, 6.34), "relora": (1339, 6.34),
           "galore": (1339, 4.76), "sltrain": (646, 4.16), "loro": (609, 3.66)},
}



def _default_method(method_cls: type, preset: str, state_dtype: str = "fp32"):
    """The preset's model config, the method at its default settings and its default optimizer settings."""
    model_cfg = get_preset(preset)
    method = method_cls(method_cls.default_settings(preset, model_cfg), model_cfg, preset)
    method.validate()
    defaults = method_cls.optim_defaults(preset)
    optim = ResolvedOptim(
        lr=defaults.lr, weight_decay=defaults.weight_decay, betas=(0.9, 0.999), eps=defaults.eps,
        grad_clip=defaults.grad_clip, total_steps=1, warmup_steps=0, min_lr_ratio=0.1, state_dtype=state_dtype,
    )
    return model_cfg, method, optim

def _weights_checksum(model: nn.Module) -> list[tuple[float, float]] | None:
    """Per-parameter float64 sum and sum of squares: cheap, and any real change shows up.
    None on the meta device, where tensors hold no values."""
    if any(p.is_meta for p in model.parameters()):
        return None
    with torch.no_grad():
        return [(float(p.double().sum()), float(p.double().square().sum())) for p in model.parameters()]


def _prefill_projectors(optimizer: torch.optim.Optimizer) -> None:
    """Create GaLore/Fira projector state with its exact shapes, without the SVD."""
    from rankscope.optim import FiraAdamW, GaLoreAdamW
    from rankscope.optim._base import new_step_counter
    from rankscope.optim.projector import projection_side

    if not isinstance(optimizer, (GaLoreAdamW, FiraAdamW)):
        return
    for group in optimizer.param_groups:
        if "rank" not in group or group["update_proj_gap"] <= 1:
            continue  # gap 1 refreshes on every step anyway: let the optimizer do it
        rank = group["rank"]
        for p in group["params"]:
            rows, cols = p.shape
            side = projection_side(p.shape, group["proj_type"])
            state = optimizer.state[p]
            # torch.linalg.svd(full_matrices=False) keeps min(rows, cols) vectors; [:rank] of them.
            kept = min(rank, rows, cols)
            dtype = optimizer.state_dtype_of(p)  # the SVD's projectors come in the state dtype
            if side in ("left", "full"):
                state["proj_left"] = torch.zeros(rows, kept, dtype=dtype, device=p.device)
            if side in ("right", "full"):
                state["proj_right"] = torch.zeros(kept, cols, dtype=dtype, device=p.device)
            # Step 1 is not a refresh step (1 % gap != 0), so the optimizer keeps these projectors.
            state["step"] = new_step_counter() + 1


def materialize_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, skip_svd: bool = True
) -> None:
    """Create every optimizer state tensor with one step that leaves the weights untouched."""
    if skip_svd:
        _prefill_projectors(optimizer)
    saved_lrs = [group["lr"] for group in optimizer.param_groups]
    before = _weights_checksum(model)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, saved_lrs):
        group["lr"] = lr
    if before is not None and _weights_checksum(model) != before:
        raise RuntimeError(
            f"materialising the state of {type(optimizer).__name__} changed the weights; "
            "its step is not a no-op at lr 0 with zero gradients (e.g. a LORO exact step on step 1)"
        )


MODES = ("shapes", "measured")


def measure_method(method_cls: type[Method], preset: str, seed: int = 0, skip_svd: bool = True,
                   mode: str = "shapes") -> dict[str, Any]:
    """account_memory of the method's default model and optimizer at `preset` (see the module doc)."""
    if mode not in MODES:
        raise ValueError(f"unknown memory mode {mode!r}: use one of {', '.join(MODES)}")
    model_cfg, method, optim = _default_method(method_cls, preset)
    torch.manual_seed(seed)
    with torch.device("meta") if mode == "shapes" else contextlib.nullcontext():
        model = method.parameterize(build_model(model_cfg))
    optimizer = method.build_optimizer(model, optim)
    check_param_groups(model, optimizer)
    materialize_optimizer_state(model, optimizer, skip_svd=skip_svd)
    row = account_memory(model, optimizer, preset)
    del model, optimizer
    if mode == "measured":
        gc.collect()  # free this model's gigabytes before the next is built (meta tensors hold none)
    return row


def memory_table(preset: str, method_names: list[str], mode: str = "shapes",
                 progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One row per method: its counts plus the published LORO Table 1 values.

    `progress` receives a line before each method and after it (with its seconds)."""
    from rankscope import methods

    preset = preset.strip().lower()
    get_preset(preset)  # unknown preset: one-line error before any work
    if mode not in MODES:
        raise ConfigError(f"unknown memory mode {mode!r}: use one of {', '.join(MODES)}")
    names = [name.strip() for name in method_names]
    classes: dict[str, Any] = {}
    for name in names:  # unknown names: a did-you-mean error before any work
        try:
            classes[name] = methods.get(name)
        except ImportError as exc:  # registered but its module is not there (yet)
            classes[name] = exc
    published = PUBLISHED_LORO_TABLE1.get(preset, {})
    rows = []
    for index, name in enumerate(names, start=1):
        row: dict[str, Any] = {"method": name, "preset": preset}
        if isinstance(classes[name], ImportError):
            row["error"] = f"not available: {classes[name]}"
            rows.append(row)
            continue
        started = time.perf_counter()
        if progress is not None:
            progress(f"[{index}/{len(names)}] {name} at {preset} ({mode})...")
        row.update(measure_method(classes[name], preset, mode=mode))
        row["seconds"] = time.perf_counter() - started
        if progress is not None:
            progress(f"[{index}/{len(names)}] {name} done in {row['seconds']:.1f}s")
        if name in published:
            row["published_params_m"], row["published_mem_gb"] = published[name]
        rows.append(row)
    return rows


def print_memory_table(rows: list[dict[str, Any]], preset: str, mode: str = "shapes") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Parameters and memory at preset {preset} (estimate: bf16 weights + optimizer states, 1 GB = 1e9 B)")
    for column in ("method", "trainable M", "total M", "frozen M", "state M", "proj. M", "buffers M",
                   "est. GB", "est. -proj GB", "fp32 GB", "pub. M", "pub. GB"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)

    def millions(value: float) -> str:
        return f"{value / 1e6:.1f}"

    for row in rows:
        if "error" in row:
            table.add_row(row["method"], *["-"] * 9, "", row["error"][:40])
            continue
        measured_now = row["param_bytes"] + row["optimizer_state_bytes"]
        table.add_row(
            row["method"],
            millions(row["trainable_params"]), millions(row["total_params"]), millions(row["frozen_params"]),
            millions(row["optimizer_state_elements"]), millions(row["optimizer_state_projector_elements"]),
            millions(row.get("buffer_elements", 0)),
            f"{row['estimated_memory_bytes'] / GB:.3f}", f"{row['estimated_memory_bytes_without_projectors'] / GB:.3f}",
            f"{measured_now / GB:.3f}",
            f"{row['published_params_m']:g}" if "published_params_m" in row else "",
            f"{row['published_mem_gb']:.2f}" if "published_mem_gb" in row else "",
        )
    # Wide enough for every column even when the output is piped (rich assumes 80 columns then).
    console = Console(width=max(Console().width, 132))
    console.print(table)
    console.print(
        "state M = optimizer-state elements (moments, momentum, GaLore/Fira projectors; proj. M = the projectors). "
        "buffers M = the model's buffers (SwitchLoRA's candidate vectors, SLTrain's support, RoPE tables), not in "
        "the estimate. "
        "est. GB = 2 bytes x (all parameters, frozen ones included, + state elements), the LORO/SLTrain "
        "convention; est. -proj = the same without projectors; fp32 GB = parameter + state bytes as built "
        "(fp32); pub. = LORO Table 1 (1 GB = 1e9 bytes). "
        + ("Counted from shapes on the meta device (same counts as real tensors; --measured builds them)."
           if mode == "shapes" else "Measured on real tensors.")
    )


# ------------------------------------------------------------------------- training estimate
# What the published 7B numbers assume, for the note under the training table.
PUBLISHED_7B_NOTE = (
    "Published 7B memory figures assume more than rankscope implements: GaLore's 7B on a 24 GB GPU "
    "(Zhao et al. 2024, arXiv 2403.03507, Fig. 1: a batch of 256 tokens) uses 8-bit optimizer states and "
    "per-layer weight updates (each layer is updated and its gradient freed during the backward, so one "
    "layer's gradients exist at a time where the grads column here holds the whole model's); SLTrain's 7B "
    "script trains with 8-bit Adam; the "
    "LORO/SLTrain tables (the est. GB column above) count bf16 weights and states only. rankscope keeps "
    "every gradient until the step and 16/32-bit states (optim.state_dtype)."
)


def _param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def training_estimate(method_cls: type[Method], preset: str, micro_batch: int, seq_len: int, gpus: int,
                      state_dtype: str = "fp32", seed: int = 0) -> dict[str, Any]:
    """Bytes one GPU holds while `method_cls` trains at `preset` under bf16-pure (see the module
    doc): components, and totals for DDP and for FSDP over `gpus`, each without and with
    activation checkpointing. Built on the meta device: seconds at 7B, no memory."""
    model_cfg, method, optim = _default_method(method_cls, preset, state_dtype)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = method.parameterize(build_model(model_cfg))
    model.to(torch.bfloat16)  # as the trainer does for bf16-pure, before building the optimizer
    optimizer = method.build_optimizer(model, optim)
    materialize_optimizer_state(model, optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = _param_bytes(model.parameters())
    grads = _param_bytes(trainable)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    activations = saved_activation_bytes(model, torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta"))
    checkpointed = activations["outside"] + activations["block_inputs"] + max(activations["blocks"], default=0)
    layers = list(model.layers)
    layer_weights = max((_param_bytes(layer.parameters()) for layer in layers), default=0)
    layer_grads_fp32 = max((4 * sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in layers),
                           default=0)
    root_weights = weights - sum(_param_bytes(layer.parameters()) for layer in layers)
    resident = weights + grads + state
    fsdp_resident = resident / gpus + root_weights + 2 * layer_weights + layer_grads_fp32
    return {
        "training_weight_bytes": weights, "training_grad_bytes": grads, "training_state_bytes": state,
        "training_ddp_bucket_bytes": 0,  # gradient_as_bucket_view=True: the gradients are the buckets
        "training_activation_bytes": activations["total"], "training_activation_checkpointed_bytes": checkpointed,
        "training_ddp_bytes": resident + activations["total"],
        "training_ddp_checkpointed_bytes": resident + checkpointed,
        "training_fsdp_bytes": fsdp_resident + activations["total"],
        "training_fsdp_checkpointed_bytes": fsdp_resident + checkpointed,
        "training_fsdp_gathered_bytes": root_weights + 2 * layer_weights + layer_grads_fp32,
    }


def training_memory_table(preset: str, method_names: list[str], micro_batch: int, seq_len: int, gpus: int,
                          state_dtype: str = "fp32") -> list[dict[str, Any]]:
    """One row per method: `training_estimate` at the given micro-batch, sequence length and GPUs."""
    from rankscope import methods
    from rankscope.optim import STATE_DTYPES

    preset = preset.strip().lower()
    get_preset(preset)
    for key, value in (("micro-batch", micro_batch), ("seq-len", seq_len), ("gpus", gpus)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{key} must be an integer >= 1, got {value!r}")
    if seq_len < 2:
        raise ConfigError(f"--seq-len must be at least 2 (a token and the one it predicts), got {seq_len}")
    if state_dtype not in STATE_DTYPES:
        raise ConfigError(f"--state-dtype {state_dtype!r}: use one of {', '.join(STATE_DTYPES)}")
    classes = {name.strip(): methods.get(name.strip()) for name in method_names}
    return [{"method": name, "preset": preset, "micro_batch": micro_batch, "seq_len": seq_len, "gpus": gpus,
             "state_dtype": state_dtype, **training_estimate(cls, preset, micro_batch, seq_len, gpus, state_dtype)}
            for name, cls in classes.items()]


def print_training_memory_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    first = rows[0]
    gpus = first["gpus"]
    table = Table(title=(
        f"Training memory per GPU at preset {first['preset']}, bf16-pure, micro-batch {first['micro_batch']} x "
        f"{first['seq_len']} tokens, optim.state_dtype={first['state_dtype']} (estimate, 1 GB = 1e9 B)"))
    for column in ("method", "weights", "grads", "state", "act.", "act. ckpt", "DDP", "DDP ckpt",
                   f"FSDP/{gpus}", f"FSDP/{gpus} ckpt"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    for row in rows:
        table.add_row(row["method"], *(f"{row[key] / GB:.1f}" for key in (
            "training_weight_bytes", "training_grad_bytes", "training_state_bytes", "training_activation_bytes",
            "training_activation_checkpointed_bytes", "training_ddp_bytes", "training_ddp_checkpointed_bytes",
            "training_fsdp_bytes", "training_fsdp_checkpointed_bytes")))
    console = Console(width=max(Console().width, 132))
    console.print(table)
    console.print(
        "weights, grads: bf16 (all gradients until the step); state: as the optimizer holds it; act.: bytes kept for "
        "the backward at this micro-batch (flash attention), ckpt: with train.activation_checkpointing (block inputs "
        "+ one recomputed block). DDP = weights + grads + state + activations (no extra bucket copy: the trainer's "
        f"DDP uses gradient_as_bucket_view; torch's default would add the grads column again). FSDP/{gpus} = "
        f"(weights + grads + state) / {gpus} + the gathered working set (embeddings and head, two layers' weights, "
        "one layer's fp32 gradients) + activations; for GaLore-family methods state / N is a lower bound. Not "
        "counted: backward temporaries, CUDA context (~0.5-1 GB), allocator caches, fragmentation, a dynamics "
        "measurement step (train.dynamics_every).")
    console.print(PUBLISHED_7B_NOTE)


__all__ = ["MODES", "PUBLISHED_7B_NOTE", "PUBLISHED_LORO_TABLE1", "materialize_optimizer_state", "measure_method",
           "memory_table", "print_memory_table", "print_training_memory_table", "training_estimate",
           "training_memory_table"]
