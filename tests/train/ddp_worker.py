"""One torchrun process of the DDP tests (tests/train/test_distributed.py): trains the runs a spec
file lists and writes, per run and rank, what the tests compare across ranks and with one process.

    torchrun --standalone --nproc_per_node 2 tests/train/ddp_worker.py SPEC.json

SPEC.json holds {"out": folder, "runs": [run, ...]}. A run is {"name", "run_dir", "overrides"}
and optionally a stop request (what a preemption signal does) made on the ranks listed in
"stop_ranks" (default: all): "stop_at" asks as update N completes, "stop_in_validation" at the
first batch of validation number N (0 = the initial one). A stopped run is trained again, which
resumes it. Per run and rank the worker writes OUT/<name>.rank<r>.pt with

- weights: the final state_dict of that rank's replica;
- masks: the first dropout masks the rank drew;
- summary: what `train()` returned; stopped_at: the step the stop ended the first attempt at;
- eval_batches: how many validation batches this rank evaluated (all attempts);
- buffer_syncs: how often DDP broadcast the model's buffers;
- grads_share_buckets: whether, at the first optimizer step, gradients were views into shared
  storage (DDP's all-reduce buckets) rather than tensors of their own.
- svds: how many matrices this rank took the SVD of for a projector (GaLore's refreshes are
  shared out among the ranks).

The worker creates the process group once and `train()` uses it (and leaves it open): creating a
fresh group per run over torchrun's one store can race with the previous group's addresses.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import ExitStack, contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.optimizer import register_optimizer_step_pre_hook

from rankscope.config import build_config
from rankscope.optim import galore as galore_module
from rankscope.train import preemption
from rankscope.train import setup as train_setup
from rankscope.train import trainer as trainer_module

MASKS_KEPT = 4


@contextmanager
def patched(owner, name: str, replacement):
    real = getattr(owner, name)
    setattr(owner, name, replacement(real))
    try:
        yield
    finally:
        setattr(owner, name, real)


def run_one(spec: dict, out: str, rank: int) -> None:
    cfg = build_config({}, spec["overrides"])
    stop_here = rank in spec.get("stop_ranks", [rank])
    seen: dict = {"masks": [], "eval_batches": 0, "validations": 0, "batch_in_validation": 0,
                  "buffer_syncs": 0, "grads_share_buckets": None, "svds": 0}

    def record_masks(real):
        def dropout(input, p=0.5, training=True, inplace=False):
            out = real(input, p, training, inplace)
            if training and p > 0 and len(seen["masks"]) < MASKS_KEPT:
                seen["masks"].append((out == 0).flatten()[:4096].clone())
            return out
        return dropout

    def capture_model(real):
        def build(*args, **kwargs):
            model, method = real(*args, **kwargs)
            seen["model"] = model
            return model, method
        return build

    def count_validations(real):  # the trainer's evaluate_loss
        def evaluate_loss(*args, **kwargs):
            seen["validations"] += 1
            seen["batch_in_validation"] = 0
            return real(*args, **kwargs)
        return evaluate_loss

    def count_validation_batches(real):  # evaluate_loss's token_losses
        def token_losses(model, batch):
            if (stop_here and seen["validations"] - 1 == spec.get("stop_in_validation")
                    and seen["batch_in_validation"] == 0):
                preemption.request_stop()
            seen["eval_batches"] += 1
            seen["batch_in_validation"] += 1
            return real(model, batch)
        return token_losses

    def stop_at_step(real):
        def update(self, done, record, tokens_per_sec):
            if stop_here and done == spec.get("stop_at"):
                preemption.request_stop()
            return real(self, done, record, tokens_per_sec)
        return update

    def count_buffer_syncs(real):
        def sync(self, *args, **kwargs):
            seen["buffer_syncs"] += 1
            return real(self, *args, **kwargs)
        return sync

    def count_svds(real):
        def compute_projection(matrices, *args, **kwargs):
            if matrices.device.type != "meta":  # meta: the shapes a receiving rank allocates
                seen["svds"] += 1 if matrices.dim() == 2 else matrices.shape[0]
            return real(matrices, *args, **kwargs)
        return compute_projection

    def first_step_grads(optimizer, args, kwargs):
        if seen["grads_share_buckets"] is None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            storages = {g.untyped_storage().data_ptr() for g in grads}
            seen["grads_share_buckets"] = len(storages) < len(grads)

    stopped_at = None
    with ExitStack() as stack:
        stack.enter_context(patched(F, "dropout", record_masks))
        stack.enter_context(patched(trainer_module, "build_training_model", capture_model))
        stack.enter_context(patched(trainer_module, "evaluate_loss", count_validations))
        stack.enter_context(patched(train_setup, "token_losses", count_validation_batches))
        stack.enter_context(patched(trainer_module.ProgressLog, "update", stop_at_step))
        stack.enter_context(patched(DistributedDataParallel, "_sync_buffers", count_buffer_syncs))
        stack.enter_context(patched(galore_module, "compute_projection", count_svds))
        hook = register_optimizer_step_pre_hook(first_step_grads)
        stack.callback(hook.remove)
        if "stop_at" in spec or "stop_in_validation" in spec:
            try:
                trainer_module.train(cfg, spec["run_dir"])
                raise AssertionError(f"run {spec['name']} was asked to stop but finished")
            except preemption.RunPreempted as stopped:
                stopped_at = stopped.step
            finally:
                preemption.clear_stop()
        summary = trainer_module.train(cfg, spec["run_dir"])
    weights = {name: tensor.detach().cpu().clone() for name, tensor in seen["model"].state_dict().items()}
    result = {key: seen[key] for key in ("masks", "eval_batches", "buffer_syncs", "grads_share_buckets", "svds")}
    torch.save({**result, "weights": weights, "summary": summary, "stopped_at": stopped_at},
               os.path.join(out, f"{spec['name']}.rank{rank}.pt"))


def main() -> None:
    with open(sys.argv[1]) as handle:
        spec = json.load(handle)
    dist.init_process_group("gloo")
    try:
        for run in spec["runs"]:
            run_one(run, spec["out"], dist.get_rank())
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
