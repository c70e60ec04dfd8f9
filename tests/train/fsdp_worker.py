"""One torchrun process of the FSDP tests: trains the runs a spec file lists, in one process group.

    torchrun --standalone --nproc_per_node 2 tests/train/fsdp_worker.py SPEC.json

SPEC.json holds {"out": folder, "runs": [run, ...], "optimizer_check": bool}. Each run is
{"name", "run_dir", "overrides"} plus, optionally, "crash_at": every rank raises as update
`crash_at` completes (before its checkpoint, as a kill would leave the run), after which the same
run is trained again to resume it. The runs' metrics, checkpoints and summaries land in their run
folders; the worker writes OUT/<name>.rank<r>.json with the summary and the step a crash ended
the first attempt at.

With "optimizer_check", GaLoreAdamW, FiraAdamW and GoLoreAdamW step row-sharded DTensor weights
(in stacks of same-shaped matrices) and plain copies of them (one by one) with the same gradients,
for every projection side and moment carry;
OUT/optimizer_check.rank<r>.json gets the largest difference per case, and how many matrices
this rank's sharded optimizer took the SVD of (each refresh's SVDs are shared out among the ranks).

The worker owns the process group: `train()` would end it when it returns, so the worker keeps
it for all its runs (one torch import and one rendezvous per launch).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from rankscope.config import build_config
from rankscope.train import trainer as trainer_module


class Crash(Exception):
    """Stands in for a kill: raised on every rank as the chosen update completes."""


def _crash_at(step: int):
    real = trainer_module.ProgressLog.update

    def update(self, done, record, tokens_per_sec):
        if done == step:
            raise Crash(step)
        return real(self, done, record, tokens_per_sec)

    return real, update


def run_one(spec: dict, out: str, rank: int) -> None:
    cfg = build_config({}, spec["overrides"])
    crashed_at = None
    if spec.get("crash_at"):
        real, crashing = _crash_at(spec["crash_at"])
        trainer_module.ProgressLog.update = crashing
        try:
            trainer_module.train(cfg, spec["run_dir"])
            raise AssertionError(f"run {spec['name']} was to crash but finished")
        except Crash as crash:
            crashed_at = crash.args[0]
        finally:
            trainer_module.ProgressLog.update = real
        # A kill leaves the run folder's lock behind with its dead owner; the lock module tells
        # a stale lock from a live one, so the resume below takes it over.
    summary = trainer_module.train(cfg, spec["run_dir"])
    with open(os.path.join(out, f"{spec['name']}.rank{rank}.json"), "w") as handle:
        json.dump({"summary": summary, "crashed_at": crashed_at}, handle, default=str)


def optimizer_check(out: str, rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from rankscope.optim import FiraAdamW, GaLoreAdamW
    from rankscope.optim import galore as galore_module
    from rankscope.optim.golore import GoLoreAdamW

    counting = {"on": False, "svds": 0}
    real_compute = galore_module.compute_projection

    def compute_projection(matrices, *args, **kwargs):
        if counting["on"] and matrices.device.type != "meta":  # meta: a receiving rank's shapes
            counting["svds"] += 1 if matrices.dim() == 2 else matrices.shape[0]
        return real_compute(matrices, *args, **kwargs)

    galore_module.compute_projection = compute_projection

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    # Tall (right side), wide (left side), square and an odd row count (uneven shards); two of one
    # shape, which `batched` steps as one stack.
    shapes = [(12, 7), (12, 7), (7, 12), (9, 9), (5, 11)]
    cases = [(GaLoreAdamW, {"scale": 0.5}, ("std", "reverse_std", "full")),
             (FiraAdamW, {}, ("std", "reverse_std")),
             (GoLoreAdamW, {"random_from_step": 2}, ("std", "reverse_std"))]
    errors, svds = {}, {}
    for cls, extra, proj_types in cases:
        for proj_type in proj_types:
            for moments in ("none", "both", "first_transient"):
                torch.manual_seed(0)
                weights = [torch.randn(shape) for shape in shapes]
                grads = [[torch.randn(shape) for shape in shapes] for _ in range(5)]
                plain = [torch.nn.Parameter(w.clone()) for w in weights]
                sharded = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in weights]
                group = {"rank": 3, "update_proj_gap": 2, "proj_type": proj_type, "reproject_moments": moments, **extra}
                optimizers = [cls([{"params": params, **group}], lr=0.01, weight_decay=0.1, batched=batched)
                              for params, batched in ((plain, False), (sharded, True))]
                for step_grads in grads:
                    for p, g in zip(plain, step_grads):
                        p.grad = g.clone()
                    for p, g in zip(sharded, step_grads):
                        p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                    optimizers[0].step()
                    counting["on"] = True
                    optimizers[1].step()
                    counting["on"] = False
                error = max(float((a - b.full_tensor()).abs().max()) for a, b in zip(plain, sharded))
                errors[f"{cls.__name__}/{proj_type}/{moments}"] = error
                svds[f"{cls.__name__}/{proj_type}/{moments}"] = counting["svds"]
                counting["svds"] = 0
    galore_module.compute_projection = real_compute
    with open(os.path.join(out, f"optimizer_check.rank{rank}.json"), "w") as handle:
        json.dump({"errors": errors, "svds": svds}, handle)


def main() -> None:
    with open(sys.argv[1]) as handle:
        spec = json.load(handle)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    trainer_module.shutdown = lambda info: None  # the worker ends the group itself, after every run
    try:
        if spec.get("optimizer_check"):
            optimizer_check(spec["out"], rank)
        for run in spec["runs"]:
            run_one(run, spec["out"], rank)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
