"""Checkpoints: written atomically, verified on load, resumable bit for bit.

Layout: RUN_DIR/checkpoints/step_XXXXXX/{model.safetensors, optim.pt, meta.json}. A checkpoint is
written into a hidden temp folder and renamed into place in one `os.replace`, and meta.json (with
the byte size and a content hash of each file) is the last file written in that folder: a folder
without a complete meta.json is never taken for a checkpoint, and one whose files do not match it
is damaged. Loading the latest checkpoint skips a damaged one (with a warning naming it) and
falls back to the previous intact one; asking for a damaged step by number is an error.

The content hash is xxHash's XXH3-128: a flipped bit anywhere changes it, and it runs near
memory speed. Measured on a 60M model with its AdamW state (697 MB of files, page cache warm, a
loaded 2-core machine; benchmarks/checkpoint_hash.py): hashing both files takes 0.13 s with
XXH3-128 against 1.0 s with SHA-256, next to 1.8 s for writing and syncing the checkpoint and
0.85 s for loading it. It guards against damage, not against a forger: a crafted optim.pt is
already harmless, since it is loaded with `weights_only=True`.
Checkpoints written before hashes existed record sizes only and still load (sizes checked).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rankscope.errors import CheckpointError
from rankscope.io import read_json, write_json_atomic

CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d{6,})$")
MODEL_FILE = "model.safetensors"
STATE_FILE = "optim.pt"
META_FILE = "meta.json"
HASH_ALGORITHM = "xxh3_128"
_HASHES = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
_READ_CHUNK = 8 << 20

log = logging.getLogger("rankscope.train")


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


def file_digest(path: Path, algorithm: str = HASH_ALGORITHM) -> str:
    """Hex content hash of a file, read in chunks."""
    digest = _HASHES[algorithm]()
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


# Files verified by this process: (path, size, mtime_ns, inode) -> digest, so that listing the
# intact checkpoints and then loading one hashes each file once.
_verified: dict[tuple[str, int, int, int], str] = {}


def _cached_digest(path: Path, algorithm: str) -> str:
    stat = path.stat()
    key = (f"{algorithm}:{path.resolve()}", stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _verified:
        _verified[key] = file_digest(path, algorithm)
    return _verified[key]


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
            hash_algorithm=HASH_ALGORITHM,
            # Hashed from the file just written (still in the page cache): what is on disk.
            files={
                name: {"size": (tmp / name).stat().st_size, "hash": file_digest(tmp / name)}
                for name in (MODEL_FILE, STATE_FILE)
            },
            complete=True,
        )
        write_json_atomic(tmp / META_FILE, full_meta)  # synced; the folder's rename publishes it
        if final.exists():
            # Re-saving a step (after a resume that fell back past it): move the old one aside
            # before the swap so there is no moment with two candidates or none. A damaged old
            # one is kept under another name rather than deleted.
            damaged = _damage(final)
            trash = root / (f"step_{step:06d}.damaged-{time.strftime('%Y%m%d-%H%M%S')}" if damaged
                            else f".old_step_{step:06d}_{time.monotonic_ns()}")
            os.replace(final, trash)
            os.replace(tmp, final)
            if damaged:
                log.warning("%s was damaged (%s); kept as %s, delete it when no longer needed", final, damaged, trash.name)
            else:
                shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _read_meta(path: Path) -> dict | None:
    # A damaged meta.json makes the folder no checkpoint (listed as incomplete, reported by
    # _damage and verify_checkpoint); the damage itself is logged here.
    meta = read_json(path / META_FILE, on_damage="none", fix="delete that checkpoint folder to use an earlier one")
    return meta if isinstance(meta, dict) and meta.get("complete") is True else None


def _damage(path: Path) -> str | None:
    """What is wrong with a checkpoint folder's files, or None when they match its meta.json."""
    meta = _read_meta(path)
    if meta is None:
        return "no complete meta.json"
    algorithm = meta.get("hash_algorithm")
    files = meta.get("files")
    if not isinstance(files, dict) or not all(isinstance(e, (int, dict)) for e in files.values()):
        return "meta.json does not list the files"
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size, digest = (entry, None) if isinstance(entry, int) else (entry.get("size"), entry.get("hash"))
        if file.stat().st_size != size:
            return f"{name} is truncated or corrupt ({file.stat().st_size} bytes, meta.json says {size})"
        if digest is None:
            log.debug("%s/%s has no content hash (written by an older rankscope); checked its size only", path, name)
        elif algorithm not in _HASHES:
            return f"meta.json names an unknown hash {algorithm!r}"
        elif _cached_digest(file, algorithm) != digest:
            return f"{name} does not match its content hash in meta.json (damaged on disk)"
    return None


def verify_checkpoint(path: Path, fix: str = "delete that folder to use an earlier one") -> dict:
    """Return the meta of a complete, intact checkpoint folder, or raise CheckpointError saying `fix`."""
    damage = _damage(path)
    if damage:
        raise CheckpointError(f"checkpoint {path} is damaged: {damage}; {fix}")
    return _read_meta(path)


def _intact(info: CheckpointInfo) -> bool:
    damage = _damage(info.path)
    if damage:
        log.warning("checkpoint %s is damaged (%s); skipping it", info.path, damage)
    return damage is None


def latest_intact_checkpoint(run_dir: str | Path, include_preemption: bool = False) -> CheckpointInfo | None:
    """The newest checkpoint whose files match its meta.json; damaged newer ones are skipped with a warning."""
    for info in reversed(list_checkpoints(run_dir, include_preemption)):
        if _intact(info):
            return info
    return None


def intact_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """Every checkpoint whose files match its meta.json, oldest first (damaged ones warned about)."""
    return [info for info in list_checkpoints(run_dir) if _intact(info)]


def list_checkpoints(run_dir: str | Path, include_preemption: bool = False) -> list[CheckpointInfo]:
    """Complete checkpoints of a run (by meta.json), oldest first. Temp folders are ignored.

    A checkpoint written because the run was stopped early (meta.json `"preemption": true`, see
    train/preemption.py) is only for resuming; it is listed only with `include_preemption`.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if not match or not child.is_dir():
            continue
        meta = _read_meta(child)
        if meta is not None and (include_preemption or not meta.get("preemption")):
            found.append(CheckpointInfo(int(match.group(1)), child, meta))
    return sorted(found, key=lambda c: c.step)


def _meta_for_loading(path: Path, verify: bool) -> dict:
    """The checkpoint's meta, its files checked against their hashes unless `verify` is False:
    under DDP rank 0 verifies the checkpoint it chose and the other ranks take its word, so the
    files are hashed once per run, not once per rank (train/setup.py, find_resume_checkpoint)."""
    if verify:
        return verify_checkpoint(path)
    meta = _read_meta(path)
    if meta is None:
        raise CheckpointError(f"{path} is not a complete checkpoint (no complete meta.json)")
    return meta


def load_model_state(path: Path, device: str | torch.device = "cpu", verify: bool = True) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint as plain tensors, written unsharded or sharded (FSDP).

    An unsharded one is read onto `device` tensor by tensor from the memory-mapped file, so loading
    onto a GPU never holds a host copy of the whole model.
    """
    if _meta_for_loading(path, verify).get("format") == "dcp":
        from rankscope.train.dcp_files import read_model_state  # imported here: it pulls in torch.distributed

        return read_model_state(path)
    try:
        return load_file(str(path / MODEL_FILE), device=str(torch.device(device)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path / MODEL_FILE}: {exc}; delete that folder to use an earlier one") from None


def load_training_state(path: Path, verify: bool = True) -> dict[str, Any]:
    """The training state (optimizer, data, method, random state), memory-mapped: tensors are
    read from the file when used (copy-on-write, the file is never changed), so the optimizer
    state goes to the device as `load_state_dict` copies it instead of first being copied whole
    into host memory by every rank."""
    _meta_for_loading(path, verify)
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
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


def prune_preemption_checkpoints(run_dir: str | Path, before: int) -> None:
    """Remove the preemption checkpoints older than `before`: a newer checkpoint supersedes them."""
    for info in list_checkpoints(run_dir, include_preemption=True):
        if info.meta.get("preemption") and info.step < before:
            shutil.rmtree(info.path, ignore_errors=True)


def clean_temp_dirs(run_dir: str | Path) -> None:
    """Remove half-written folders left by a kill during a write (they were never complete)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith((".tmp_step_", ".old_step_")):
                shutil.rmtree(child, ignore_errors=True)


# -- random state ------------------------------------------------------------------------------
# A checkpoint's "rng" entry holds the random state of every training process, by rank:
# {"ranks": [state of rank 0, state of rank 1, ...]}, each {"torch": the CPU generator, "python":
# the `random` module, "cuda": the generator of that rank's own GPU (CUDA runs only)}. Under DDP
# each rank draws its own dropout masks (the trainer seeds the ranks apart), so each rank
# restores its own state. Only a rank's own device is touched, so a resume on fewer GPUs, or
# with fewer or more processes, works: ranks without a saved state start a fresh stream, and
# both are said in a warning. Checkpoints written before per-rank states hold one process's
# {"torch", "python", "cuda": [one state per visible GPU]}: read as rank 0's.


def capture_rng_state(
    device: torch.device, get_cuda_state: Callable[[torch.device], torch.Tensor] | None = None
) -> dict[str, Any]:
    """This process's random state; `get_cuda_state` stands in for torch.cuda.get_rng_state in tests."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = (get_cuda_state or torch.cuda.get_rng_state)(device)
    return state


def _per_rank(saved: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    if "ranks" in saved:
        return list(saved["ranks"])
    legacy = {"torch": saved["torch"], "python": saved["python"]}
    devices = saved.get("cuda")
    if devices is not None and device.type == "cuda" and (device.index or 0) < len(devices):
        legacy["cuda"] = devices[device.index or 0]
    return [legacy]


def restore_rng_state(
    saved: dict[str, Any],
    rank: int,
    world_size: int,
    device: torch.device,
    fresh_seed: int,
    set_cuda_state: Callable[[torch.Tensor, torch.device], None] | None = None,
) -> bool:
    """Restore rank `rank`'s saved random state; True when it had one.

    A rank the checkpoint has no state for (more processes than saved) seeds its streams with
    `fresh_seed` instead. A process count that differs from the saved one is warned about (by
    rank 0): the run continues, but its random draws no longer repeat the interrupted run's.
    `set_cuda_state` stands in for torch.cuda.set_rng_state in tests.
    """
    states = _per_rank(saved, device)
    if rank == 0 and len(states) != world_size:
        log.warning(
            "the checkpoint holds the random state of %d process(es), this run has %d: %s; training continues, "
            "but its dropout masks differ from those the interrupted run would have drawn",
            len(states), world_size,
            f"ranks {len(states)}..{world_size - 1} start fresh streams" if world_size > len(states)
            else f"the states of ranks {world_size}..{len(states) - 1} are left unused",
        )
    if rank >= len(states):
        torch.manual_seed(fresh_seed)
        random.seed(fresh_seed)
        return False
    state = states[rank]
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if device.type == "cuda":
        if "cuda" in state:
            (set_cuda_state or torch.cuda.set_rng_state)(state["cuda"], device)
        else:
            log.warning("rank %d: the checkpoint holds no CUDA random state for %s (written on another device type "
                        "or with fewer GPUs); that GPU's random stream is not restored", rank, device)
    return True


def _as_tuple(value: Any) -> Any:
    """random.setstate needs the tuples the checkpoint may hold as lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
