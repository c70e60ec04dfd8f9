"""Row-sharded tensors (FSDP2's DTensor parameters) as the optimizers and periodic work see them.

Under `train.parallel=fsdp` every parameter is a DTensor sharded by rows over a 1-D mesh
(`Shard(0)`): rank i holds rows [i·c, (i+1)·c) with c = ceil(rows / world), torch.chunk's split,
so the last ranks may hold fewer rows or none. Elementwise work (Adam moments, weight decay)
runs on DTensors as it is. Work that needs a whole matrix (an SVD, a QR, a Newton–Schulz
iteration, a random draw over the matrix) uses these helpers:

- `full(t)`: the whole tensor on every rank (an all-gather), a plain tensor unchanged;
- `local(t)`: this rank's rows as a plain tensor (no copy; writing it writes the DTensor);
- `local_rows(whole, like)`: the rows of `whole` that `like` holds here;
- `write_full_(target, whole)`: target <- whole, each rank writing its own rows;
- `sum_over_shards(partial, like)`: the all-reduced sum of per-rank partial results;
- `sharded_like(piece, like)`: a DTensor from this rank's rows of a tensor with `like`'s rows;
- `full_parameters(modules)`: within the block, the modules' DTensor parameters are replaced by
  plain whole tensors (gathered), and written back row by row on leaving it.
- `computed_by_one_rank(count, gather, compute, group)`: per-matrix work that needs whole
  matrices (a projector refresh's SVDs) shared out among the ranks, each result broadcast.

Every rank computes on the same gathered values with the same seeded generators, so the result
equals the single-process one bit for bit (given the same inputs) and the ranks keep agreeing.
With plain tensors (one process, or DDP) every helper is the identity or a plain copy.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def _check_row_sharded(t: DTensor) -> None:
    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise NotImplementedError(
            f"rankscope handles tensors sharded by rows over one mesh dimension (FSDP2's default); got "
            f"placements {tuple(t.placements)} on a {t.device_mesh.ndim}-D mesh"
        )


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a DTensor (the DTensor's own storage), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor as a plain tensor on every rank (an all-gather for a sharded DTensor)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def row_range(like: DTensor) -> tuple[int, int]:
    """(first row, row count) of the rows `like` holds on this rank."""
    _check_row_sharded(like)
    rows, world = like.shape[0], like.device_mesh.size()
    chunk = math.ceil(rows / world) if rows else 0
    start = min(like.device_mesh.get_local_rank() * chunk, rows)
    return start, like.to_local().shape[0]


def local_rows(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The rows of `whole` (a plain tensor with `like`'s number of rows) that `like` holds here."""
    if not isinstance(like, DTensor):
        return whole
    start, count = row_range(like)
    return whole.narrow(0, start, count)


@torch.no_grad()
def write_full_(target: torch.Tensor, whole: torch.Tensor) -> None:
    """target <- whole (a plain tensor of target's global shape); each rank writes its own rows."""
    local(target).copy_(local_rows(whole, target))


def sum_over_shards(partial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a per-rank partial result (such as P_localᵀ·G_local) over the ranks holding `like`'s rows,
    in place; a plain `like` means one process: `partial` is already the sum."""
    if isinstance(like, DTensor):
        _check_row_sharded(like)
        dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=like.device_mesh.get_group())
    return partial


def sharded_like(piece: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A DTensor whose rows are split as `like`'s are, from this rank's rows `piece`; `piece`
    itself when `like` is plain. The other dimensions are `piece`'s."""
    if not isinstance(like, DTensor):
        return piece
    _check_row_sharded(like)
    shape = torch.Size((like.shape[0], *piece.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(piece, like.device_mesh, (Shard(0),), run_check=False, shape=shape, stride=stride)


@contextlib.contextmanager
def full_parameters(modules: Iterable[nn.Module], names: tuple[str, ...] | None = None) -> Iterator[None]:
    """Within the block, the DTensor parameters of `modules` (and their submodules; only those
    called one of `names` if given) are plain whole tensors; leaving it normally writes each
    rank's rows back into the DTensor it came from and puts that DTensor back.

    For periodic work written against plain tensors (ReLoRA's merge, a refactorization). Inside
    the block the optimizer's state is still keyed by the DTensor parameters: touch it outside.
    """
    swapped: list[tuple[nn.Module, str, DTensor]] = []
    seen: set[int] = set()
    completed = False
    try:
        for module in modules:
            for sub in module.modules():
                if id(sub) in seen:
                    continue
                seen.add(id(sub))
                for name, param in list(sub.named_parameters(recurse=False)):
                    if isinstance(param, DTensor) and (names is None or name in names):
                        whole = nn.Parameter(full(param.detach()), requires_grad=param.requires_grad)
                        sub._parameters[name] = whole
                        swapped.append((sub, name, param))
        yield
        completed = True
    finally:
        for sub, name, param in reversed(swapped):
            if completed:
                write_full_(param, sub._parameters[name].detach())
            sub._parameters[name] = param


def computed_by_one_rank(count: int, gather: Callable[[int], torch.Tensor],
                         compute: Callable[[int, torch.Tensor], dict[str, torch.Tensor]],
                         group: dist.ProcessGroup) -> list[dict[str, torch.Tensor]]:
    """`compute(i, gather(i))` for i < count, each run by one rank and broadcast to the others.

    `gather(i)` gives the whole matrix i on every rank: under FSDP an all-gather (a collective that
    every rank calls in the same order), under DDP the already all-reduced gradient itself.
    `compute` must give the same result on any rank (seeded, no rank-dependent state) and, given a
    meta tensor, the shapes and dtypes of its results. Items go round robin in rounds of
    `world`: each rank gathers the round's matrices, keeps only its own (at most two whole
    matrices alive at once, as one would be without sharing), computes it while the others compute
    theirs, then every result is broadcast from its rank. Per round the ranks wait for the slowest
    item only, instead of each running every item: a refresh's compute divided by the world size,
    for broadcasts of the (small) results. `group`: the ranks that share the work.
    """
    world, me = dist.get_world_size(group), dist.get_rank(group)
    results: list[dict[str, torch.Tensor]] = []
    for start in range(0, count, world):
        items = range(start, min(start + world, count))
        own, shapes = None, {}
        for offset, i in enumerate(items):
            whole = gather(i)
            shapes[i] = (torch.empty(whole.shape, dtype=whole.dtype, device="meta"), whole.device)
            if offset == me:
                own = whole
            del whole
        computed = compute(start + me, own) if own is not None else None
        del own
        for offset, i in enumerate(items):
            if offset == me:
                result = computed
            else:
                meta, device = shapes[i]
                result = {key: torch.empty(value.shape, dtype=value.dtype, device=device)
                          for key, value in compute(i, meta).items()}
            for key in sorted(result):
                dist.broadcast(result[key], src=dist.get_global_rank(group, offset), group=group)
            results.append(result)
    return results


def mesh_group(like: DTensor) -> dist.ProcessGroup:
    """The process group of the ranks that hold `like`'s rows."""
    _check_row_sharded(like)
    return like.device_mesh.get_group()


def state_is_row_sharded(optimizer: torch.optim.Optimizer, key: str, param: torch.Tensor,
                         shape: tuple[int, ...]) -> bool:
    """Whether the optimizer state `key` (global `shape`) of a sharded `param` is split by rows
    like it: every state tensor shaped like its parameter (Adam moments, momenta), and the keys an
    optimizer lists in `row_sharded_state` whose rows are the parameter's rows (GaLore's
    right-side moments and left-side projector). Everything else (counters, projectors and
    moments on the rank axis, power-iteration vectors) is replicated: every rank holds it whole."""
    if not is_sharded(param) or len(shape) == 0:
        return False
    if tuple(shape) == tuple(param.shape):
        return True
    return key in getattr(optimizer, "row_sharded_state", ()) and shape[0] == param.shape[0]
