"""FSDP2 for `train.parallel=fsdp`: parameters, gradients and optimizer state sharded by rows.

`shard_model` applies `torch.distributed.fsdp.fully_shard` to every decoder layer and then to
the root (embeddings, final norm, head): each rank keeps 1/world of the rows of every parameter;
a layer's whole weights exist only while its forward or backward runs (all-gathered, then freed),
and its gradients are reduce-scattered back into row shards. What a method sees between steps is
a model whose parameters are DTensors (`Shard(0)`), with the names and shapes of the plain model,
so its optimizer is built after sharding, exactly as without it.

Mixed precision (`MixedPrecisionPolicy`): under `train.precision=bf16-autocast` the gathered
parameters are bf16 (the sharded master copy and the optimizer stay fp32) and gradients are
reduced in fp32; under `bf16-pure` the parameters are bf16 already and gradients are still reduced
in fp32; under fp32 everything is fp32. Activation checkpointing (`train.activation_checkpointing`)
is the model's own (a non-reentrant `torch.utils.checkpoint` per block), which FSDP2 composes with:
the recomputation gathers the layer's weights again.

Which methods train sharded is each method's declaration (`Method.fsdp_refusal`,
`Method.check_fsdp`): the ones whose blocks are factors or sparse parts shard as they are, their
periodic work (merges, refactorizations, exact steps, Newton–Schulz and power iterations) gathers
the matrices it needs (rankscope.optim.sharded); GaLore-style optimizers project row shards
(rankscope.optim.galore, "Under FSDP"). A refused method fails before anything is built, with an
error that names it and says why.

Under one process there is no process group to shard over: the model stays plain and only the
checkpoint format (torch.distributed.checkpoint, train/sharded_checkpoint.py) follows the setting,
so a run can move between world sizes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from rankscope.config import RunConfig
from rankscope.errors import ConfigError
from rankscope.methods.base import Method

# What each precision gathers parameters in and reduces gradients in.
_PARAM_DTYPES = {"fp32": None, "bf16-autocast": torch.bfloat16, "bf16-pure": None}


def uses_fsdp(cfg: RunConfig) -> bool:
    return cfg.train.parallel == "fsdp"


def check_fsdp_settings(cfg: RunConfig, method: Method) -> None:
    """Refuse, before any work, what cannot train sharded: the method (its own reasons) and
    torch.compile (not tried with the per-layer sharding here)."""
    if not uses_fsdp(cfg):
        return
    method.check_fsdp()
    if cfg.train.compile:
        raise ConfigError("train.compile=true is not supported with train.parallel=fsdp yet; set train.compile=false "
                          "or use train.parallel=ddp")


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """bf16 gathered parameters under bf16-autocast; gradients always reduced in fp32."""
    return MixedPrecisionPolicy(param_dtype=_PARAM_DTYPES[precision], reduce_dtype=torch.float32)


def shard_model(model: nn.Module, device: torch.device, world_size: int, precision: str) -> nn.Module:
    """fully_shard each decoder layer, then the root; returns the same (now sharded) model.

    Every rank must pass an identical model (built from the same seed): each keeps its rows.
    """
    mesh = init_device_mesh(device.type, (world_size,))
    policy = mixed_precision_policy(precision)
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ConfigError("train.parallel=fsdp shards a model per decoder layer, but this model has no `layers`")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded_model(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate this micro-batch's gradients locally: DDP's `no_sync()`, FSDP2's
    `set_requires_gradient_sync(False)` (unsharded gradients kept until the step's last micro-batch)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield
