"""Process-group setup for `torchrun` (NCCL on GPU, gloo on CPU), the few collectives we use, the
DDP wrapper and each rank's own random stream."""

from __future__ import annotations

import inspect
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


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


def rank_stream_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank `rank`'s random stream for training (dropout) when it starts at `step`:
    seed, rank and step mixed by odd 64-bit multipliers, so that nearby values give unrelated streams."""
    return (seed + rank * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9) % 2**63


def separate_rank_streams(seed: int, rank: int) -> None:
    """Give each process its own random stream for training once the model is built (its init
    must be identical on every rank), so that DDP ranks draw independent dropout masks rather
    than the same ones. Rank 0 keeps the stream that follows the init: a single-process run draws
    exactly what it drew before the ranks had streams of their own."""
    if rank > 0:
        stream_seed = rank_stream_seed(seed, rank)
        torch.manual_seed(stream_seed)  # the CPU generator and every CUDA device's
        random.seed(stream_seed)


def share_optimizer_work(optimizer: torch.optim.Optimizer) -> None:
    """Under DDP, let the optimizer share out over all ranks the work each replica would repeat on
    identical values (a GaLore refresh's SVDs: `RankscopeOptimizer.share_work_over`)."""
    from rankscope.optim import RankscopeOptimizer

    if isinstance(optimizer, RankscopeOptimizer):
        optimizer.share_work_over(dist.group.WORLD)


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the model's trainable parameters (those with requires_grad when it is built).

    No buffer broadcast before each forward: every buffer (RoPE tables, SLTrain's sparse indices,
    SwitchLoRA's candidate banks) is built from the seed or changed by seeded, rank-independent
    work, so the ranks already agree, and DDP's default would re-send all of them every step.
    `gradient_as_bucket_view=True`: gradients live in DDP's all-reduce buckets instead of a second
    copy of every gradient beside them; the optimizers only read `p.grad`, and
    `zero_grad(set_to_none=True)` is fine with it (DDP re-creates the views on the next backward).
    """
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        **{_NO_FORWARD_BUFFER_SYNC: False},
    )


# torch 2.13 renamed DDP's broadcast_buffers to forward_sync_buffers (the old name warns); older
# versions know only the old one.
_NO_FORWARD_BUFFER_SYNC = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    else "broadcast_buffers"
)
