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
from rankscope.methods.memory_accounting import account_memory
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
            if side in ("left", "full"):
                state["proj_left"] = torch.zeros(rows, kept, dtype=p.dtype, device=p.device)
            if side in ("right", "full"):
                state["proj_right"] = torch.zeros(kept, cols, dtype=p.dtype, device=p.device)
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
    model_cfg = get_preset(preset)
    method = method_cls(method_cls.default_settings(preset, model_cfg), model_cfg, preset)
    method.validate()
    defaults = method_cls.optim_defaults(preset)
    optim = ResolvedOptim(
        lr=defaults.lr, weight_decay=defaults.weight_decay, betas=(0.9, 0.999), eps=defaults.eps,
        grad_clip=defaults.grad_clip, total_steps=1, warmup_steps=0, min_lr_ratio=0.1,
    )
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


__all__ = ["MODES", "PUBLISHED_LORO_TABLE1", "materialize_optimizer_state", "measure_method", "memory_table",
           "print_memory_table"]
