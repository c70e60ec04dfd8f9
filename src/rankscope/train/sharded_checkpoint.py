"""Checkpoints of `train.parallel=fsdp` runs: torch.distributed.checkpoint, published atomically.

Layout: RUN_DIR/checkpoints/step_XXXXXX/{dcp/, training.pt, meta.json}.

- dcp/ holds the tensors, written by every rank at once (each its own rows, `torch.distributed.
  checkpoint.save`): "model/<name>" for the model state dict and "optim/<name>/<state key>" for the
  optimizer state of parameter <name>. Sharded tensors are stored with their global shapes, so a
  checkpoint loads at any world size, one process included (DCP reads the pieces each rank needs).
- training.pt (rank 0, `weights_only`-loadable): everything else a resume needs, as
  train/checkpoint.py's optim.pt holds it (data stream, method state, every rank's random state,
  step) plus the optimizer's param groups with parameter names in place of ids, and the state
  keys of each parameter.
- meta.json: train/checkpoint.py's (`format: "dcp"`, the world size that wrote it, and the size and
  content hash of every file), written last. So `list_checkpoints`, `latest_intact_checkpoint`,
  `verify_checkpoint` and pruning treat both formats alike, and `checkpoint.load_model_state`
  reads a sharded one as a plain state dict (train/dcp_files.py) for export, analysis and eval.

Publishing is train/checkpoint.py's: everything goes into a hidden temp folder (its name chosen
by rank 0 and sent to the others), rank 0 writes meta.json last and renames the folder into place
once every rank's shards are on disk; a kill at any point leaves no folder that looks complete.
All ranks must call `save_sharded_checkpoint` and `load_sharded_checkpoint` together.

Which optimizer state is sharded when loading is decided by the run loading it, not the one that
saved (rankscope.optim.sharded.state_is_row_sharded): state shaped like its parameter and the keys
an optimizer declares row-aligned are split by rows, the rest is whole on every rank.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor import empty as dtensor_empty

from rankscope.errors import CheckpointError
from rankscope.io import write_json_atomic
from rankscope.optim.sharded import is_sharded, state_is_row_sharded
from rankscope.train.checkpoint import (
    CHECKPOINT_DIR,
    HASH_ALGORITHM,
    META_FILE,
    file_digest,
    step_dir,
    verify_checkpoint,
)
from rankscope.train.dcp_files import (
    CHECKPOINT_FORMAT,
    DCP_FOLDER,
    MODEL_PREFIX,
    load_in_place,
    optim_key,
    save_tensors,
    tensor_metadata,
)
from rankscope.train.distributed import DistInfo, barrier

TRAINING_FILE = "training.pt"

log = logging.getLogger("rankscope.train")


def is_sharded_checkpoint(meta: dict) -> bool:
    return meta.get("format") == CHECKPOINT_FORMAT


def _parameter_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state tensors by DCP key, and what else restores it (groups by name)."""
    names = _parameter_names(model)
    tensors: dict[str, torch.Tensor] = {}
    state_keys: dict[str, list[str]] = {}
    groups = []
    for group in optimizer.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            name = names[id(p)]
            for key, value in optimizer.state.get(p, {}).items():
                if not torch.is_tensor(value):
                    raise CheckpointError(f"optimizer state {name}/{key} is a {type(value).__name__}; rankscope keeps "
                                          "optimizer state as tensors only")
                if is_sharded(value) != state_is_row_sharded(optimizer, key, p, tuple(value.shape)):
                    raise CheckpointError(
                        f"optimizer state {name}/{key} of shape {tuple(value.shape)} is "
                        f"{'sharded' if is_sharded(value) else 'whole'} but a resume would load it "
                        f"{'whole' if is_sharded(value) else 'sharded'} (rankscope.optim.sharded.state_is_row_sharded)")
                tensors[optim_key(name, key)] = value
                state_keys.setdefault(name, []).append(key)
    return tensors, {"param_groups": groups, "state_keys": state_keys}


def _agreed_temp_folder(root: Path, step: int, dist_info: DistInfo) -> Path:
    name = [f".tmp_step_{step:06d}_{os.getpid()}_{time.monotonic_ns()}" if dist_info.is_main else None]
    if dist_info.enabled:
        dist.broadcast_object_list(name, src=0)
    return root / name[0]


def save_sharded_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    training_state: dict[str, Any],
    meta: dict[str, Any],
    dist_info: DistInfo,
) -> Path:
    """Write the step's checkpoint from every rank (rank 0's `training_state` and `meta` are the
    ones written). Returns the published folder (on every rank, after all have finished)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    final = step_dir(run_dir, step)
    if dist_info.is_main:
        root.mkdir(parents=True, exist_ok=True)
    tmp = _agreed_temp_folder(root, step, dist_info)
    if dist_info.is_main:
        tmp.mkdir()
    barrier(dist_info)
    failed = False
    try:
        optim_tensors, optim_layout = _optimizer_tensors(model, optimizer)
        tensors = {MODEL_PREFIX + name: value for name, value in model.state_dict().items()}
        tensors.update(optim_tensors)
        save_tensors(tensors, tmp / DCP_FOLDER, no_dist=not dist_info.enabled)
        if dist_info.is_main:
            torch.save({**training_state, "optimizer_layout": optim_layout}, tmp / TRAINING_FILE)
            with open(tmp / TRAINING_FILE, "rb") as handle:
                os.fsync(handle.fileno())
            _publish(tmp, final, step, meta, dist_info.world_size)
    except BaseException:
        failed = True
        raise
    finally:
        if failed and dist_info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    barrier(dist_info)
    return final


def _publish(tmp: Path, final: Path, step: int, meta: dict[str, Any], world_size: int) -> None:
    files = sorted(str(path.relative_to(tmp)) for path in tmp.rglob("*") if path.is_file())
    full_meta = dict(meta)
    full_meta.update(
        step=step,
        format=CHECKPOINT_FORMAT,
        world_size=world_size,
        hash_algorithm=HASH_ALGORITHM,
        files={name: {"size": (tmp / name).stat().st_size, "hash": file_digest(tmp / name)} for name in files},
        complete=True,
    )
    write_json_atomic(tmp / META_FILE, full_meta)
    if not final.exists():
        os.replace(tmp, final)
        return
    # Re-saving a step (after a resume that fell back past it), as train/checkpoint.py does: the
    # old folder moves aside first (kept under a visible name when damaged), then the swap.
    try:
        verify_checkpoint(final)
        damaged = False
    except CheckpointError:
        damaged = True
    trash = final.parent / (f"{final.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}" if damaged
                            else f".old_{final.name}_{time.monotonic_ns()}")
    os.replace(final, trash)
    os.replace(tmp, final)
    if damaged:
        log.warning("%s was damaged; kept as %s, delete it when no longer needed", final, trash.name)
    else:
        shutil.rmtree(trash, ignore_errors=True)


def _empty_target(optimizer: torch.optim.Optimizer, key: str, param: torch.Tensor, meta) -> torch.Tensor:
    shape, dtype = tuple(meta.size), meta.properties.dtype
    if state_is_row_sharded(optimizer, key, param, shape):
        assert isinstance(param, DTensor)
        return dtensor_empty(shape, dtype=dtype, device_mesh=param.device_mesh, placements=(Shard(0),))
    # Whole on every rank; the optimizer's load_state_dict moves it where its parameter is.
    return torch.empty(shape, dtype=dtype)


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                            verify: bool = True) -> dict[str, Any]:
    """Load a sharded checkpoint into `model` and `optimizer` (sharded or plain, any world size)
    and return its training state (data stream, method, rng, step, ...). Collective under FSDP.
    `verify=False` skips hashing the files (a rank whose rank 0 verified them, train/setup.py
    find_resume_checkpoint)."""
    if verify:
        verify_checkpoint(path)
    try:
        training = torch.load(Path(path) / TRAINING_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"cannot read {Path(path) / TRAINING_FILE} ({type(exc).__name__}); delete that folder "
                              "to use an earlier one") from None
    folder = Path(path) / DCP_FOLDER
    saved = tensor_metadata(folder)
    model_state = model.state_dict()
    saved_model = {key[len(MODEL_PREFIX):] for key in saved if key.startswith(MODEL_PREFIX)}
    if saved_model != set(model_state):
        missing, unexpected = sorted(set(model_state) - saved_model), sorted(saved_model - set(model_state))
        raise CheckpointError(f"checkpoint {path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    targets: dict[str, torch.Tensor] = {MODEL_PREFIX + name: value for name, value in model_state.items()}

    layout = training.pop("optimizer_layout")
    params = dict(model.named_parameters())
    names = _parameter_names(model)
    if any(id(p) not in names for group in optimizer.param_groups for p in group["params"]):
        raise CheckpointError("an optimizer parameter is not a parameter of the model")
    current = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    saved_groups = [group["params"] for group in layout["param_groups"]]
    if current != saved_groups:
        raise CheckpointError(f"checkpoint {path} holds optimizer groups of other parameters than this run's "
                              f"({[len(g) for g in saved_groups]} vs {[len(g) for g in current]} per group)")
    for name, keys in layout["state_keys"].items():
        for key in keys:
            targets[optim_key(name, key)] = _empty_target(optimizer, key, params[name], saved[optim_key(name, key)])
    load_in_place(targets, folder)
    model.load_state_dict({name: targets[MODEL_PREFIX + name] for name in model_state})

    index = {name: i for i, name in enumerate(n for group in current for n in group)}
    state = {index[name]: {key: targets[optim_key(name, key)] for key in keys}
             for name, keys in layout["state_keys"].items()}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in layout["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return training

