"""Process-group setup for `torchrun` (NCCL on GPU, gloo on CPU) and the few collectives we use."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # Whether init_distributed created the process group (and `shutdown` ends it). A group that
    # was there before is its creator's to end, so one program can train several runs in it.
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str, timeout_min: float = 60.0) -> DistInfo:
    """Join the process group torchrun describes in the environment; single process otherwise.

    `timeout_min` (train.dist_timeout_min) bounds how long a collective waits for its slowest
    rank. NCCL's own default is 10 minutes, shorter than rank 0 may need alone for a large
    checkpoint on a shared file system while the other ranks wait in a barrier. On CUDA the group
    is bound to this rank's GPU (`device_id`): NCCL then connects at once and `barrier()` knows
    which device to use instead of guessing.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns_group = not dist.is_initialized()
    if owns_group:
        backend = "nccl" if device_type == "cuda" else "gloo"
        device_id = None
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
            device_id = torch.device("cuda", local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_min), device_id=device_id)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, owns_group=owns_group)


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_gather_objects(value: Any, info: DistInfo) -> list[Any]:
    """Every rank's `value` (picklable, small), in rank order; [value] for a single process."""
    if not info.enabled:
        return [value]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
