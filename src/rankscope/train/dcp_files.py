"""Reading a sharded (torch.distributed.checkpoint) checkpoint into plain tensors, in one process.

A checkpoint written under `train.parallel=fsdp` (train/sharded_checkpoint.py) keeps its tensors
in RUN_DIR/checkpoints/step_XXXXXX/dcp/: one file of row shards per rank that wrote it plus a
`.metadata` index of every tensor's global shape and where its pieces are. Keys are
"model/<parameter name>" and "optim/<parameter name>/<state key>". Export, analysis and
evaluation need the whole model in one process without a process group: `read_model_state`
gives the plain state dict that a `model.safetensors` would have held, whatever the world size
that wrote it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from rankscope.errors import CheckpointError

DCP_FOLDER = "dcp"
CHECKPOINT_FORMAT = "dcp"
MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"


def optim_key(name: str, state_key: str) -> str:
    return f"{OPTIM_PREFIX}{name}/{state_key}"


def tensor_metadata(folder: Path) -> dict[str, TensorStorageMetadata]:
    """Global shape and dtype of every tensor a DCP folder holds, by key."""
    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:  # a missing or damaged .metadata raises several types
        raise CheckpointError(f"cannot read the sharded checkpoint index in {folder} ({type(exc).__name__}: {exc}); "
                              "delete that checkpoint folder to use an earlier one") from None
    return {key: value for key, value in metadata.state_dict_metadata.items()
            if isinstance(value, TensorStorageMetadata)}


def load_in_place(targets: dict[str, torch.Tensor], folder: Path) -> None:
    """Fill `targets` (plain tensors or DTensors of the saved global shapes) from a DCP folder.

    Collective when a process group is up (every rank calls it with its own shards); a plain
    read otherwise.
    """
    import torch.distributed as dist

    _load(targets, folder, no_dist=not dist.is_initialized())


def read_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The whole model state dict of a sharded checkpoint folder, as plain CPU tensors.

    Reads without a process group even inside one (each caller gets its own full copy), so
    analysis may run under torchrun too.
    """
    folder = Path(path) / DCP_FOLDER
    shapes = {key[len(MODEL_PREFIX):]: meta for key, meta in tensor_metadata(folder).items()
              if key.startswith(MODEL_PREFIX)}
    if not shapes:
        raise CheckpointError(f"the sharded checkpoint in {folder} holds no model tensors; delete that folder "
                              "to use an earlier one")
    targets = {MODEL_PREFIX + name: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
               for name, meta in shapes.items()}
    _load(targets, folder, no_dist=True)
    return {key[len(MODEL_PREFIX):]: value for key, value in targets.items()}


def _load(targets: dict[str, torch.Tensor], folder: Path, no_dist: bool) -> None:
    with warnings.catch_warnings():
        # DCP warns that it loads "in a single process" whenever there is no process group: meant.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(targets, checkpoint_id=str(folder), no_dist=no_dist)


def save_tensors(tensors: dict[str, torch.Tensor], folder: Path, no_dist: bool) -> None:
    """Write `tensors` (DTensors as their global tensors) into a DCP folder; collective unless `no_dist`.
    DCP's writer syncs every file it writes, and its coordinator (rank 0) writes the index only
    after every rank reported its shards written."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(tensors, checkpoint_id=str(folder), no_dist=no_dist)
