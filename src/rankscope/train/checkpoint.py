"""Checkpoints: written atomically, verified on load, resumable bit for bit.

Layout: RUN_DIR/checkpoints/step_XXXXXX/{model.safetensors, optim.pt, meta.json}. A checkpoint is
written into a hidden temp folder and renamed into place in one `os.replace`, and meta.json (with
the byte size of each file) is the last file written in that folder: a folder without a complete
meta.json, or whose files do not match it, is never taken for a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rankscope.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d{6,})$")
MODEL_FILE = "model.safetensors"
STATE_FILE = "optim.pt"
META_FILE = "meta.json"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    meta: dict


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:06d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    training_state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write a checkpoint atomically and return its folder."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(run_dir, step)
    tmp = root / f".tmp_step_{step:06d}_{os.getpid()}_{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        save_file(tensors, str(tmp / MODEL_FILE))
        torch.save(training_state, tmp / STATE_FILE)
        for name in (MODEL_FILE, STATE_FILE):
            _fsync_file(tmp / name)
        full_meta = dict(meta)
        full_meta.update(
            step=step,
            files={name: (tmp / name).stat().st_size for name in (MODEL_FILE, STATE_FILE)},
            complete=True,
        )
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2))
        _fsync_file(tmp / META_FILE)
        if final.exists():
            # Re-saving a step (e.g. after a resume): move the old one aside before the swap so
            # there is no moment with two candidates or none.
            trash = root / f".old_step_{step:06d}_{time.monotonic_ns()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _read_meta(path: Path) -> dict | None:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    return meta if meta.get("complete") else None


def verify_checkpoint(path: Path) -> dict:
    """Return the meta of a complete, intact checkpoint folder, or raise CheckpointError."""
    meta = _read_meta(path)
    if meta is None:
        raise CheckpointError(
            f"checkpoint {path} is incomplete (no complete meta.json); delete that folder to use an earlier one"
        )
    for name, size in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} lacks {name}; delete that folder to use an earlier one")
        if file.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {path}/{name} is truncated or corrupt ({file.stat().st_size} bytes, "
                f"meta.json says {size}); delete that folder to use an earlier one"
            )
    return meta


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints of a run (by meta.json), oldest first. Temp folders are ignored."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if not match or not child.is_dir():
            continue
        meta = _read_meta(child)
        if meta is not None:
            found.append(CheckpointInfo(int(match.group(1)), child, meta))
    return sorted(found, key=lambda c: c.step)


def load_model_state(path: Path) -> dict[str, torch.Tensor]:
    verify_checkpoint(path)
    try:
        return load_file(str(path / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path / MODEL_FILE}: {exc}; delete that folder to use an earlier one") from None


def load_training_state(path: Path) -> dict[str, Any]:
    verify_checkpoint(path)
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged pickle/zip
        raise CheckpointError(
            f"cannot read {path / STATE_FILE} ({type(exc).__name__}); delete that folder to use an earlier one"
        ) from None


def prune_checkpoints(run_dir: str | Path, keep_last: int, protect: set[int] = frozenset()) -> None:
    if keep_last <= 0:
        return
    checkpoints = list_checkpoints(run_dir)
    for info in checkpoints[:-keep_last]:
        if info.step not in protect:
            shutil.rmtree(info.path, ignore_errors=True)


def clean_temp_dirs(run_dir: str | Path) -> None:
    """Remove half-written folders left by a kill during a write (they were never complete)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith((".tmp_step_", ".old_step_")):
                shutil.rmtree(child, ignore_errors=True)
