"""A GaLore projector refresh under FSDP or DDP (gloo on the CPU): each SVD on one rank vs on every rank.

    python benchmarks/galore_refresh.py [--parallel fsdp|ddp] [--preset 60m] [--layers 2] [--rank 128] [--repeats 3]

Launches one `torchrun --nproc_per_node 2` of itself (one thread per process). The targeted
weights of `--layers` decoder layers of the preset (q, k, v, o, gate, up, down) are row-sharded
DTensors (fsdp) or replicated tensors with the same gradients on every rank (ddp) in a GaLore group; the benchmark times (best of `--repeats`) an optimizer step at a
refresh (step 0: every matrix all-gathered and SVD'd) and a step between refreshes, once as
rankscope runs it (`computed_by_one_rank`: each SVD on one rank, its projectors broadcast) and
once with every rank computing every SVD (the code before: under FSDP the baseline below, under
DDP an optimizer that was not asked to `share_work_over` the ranks). Both give
the same projectors (checked). Prints a table; asserts nothing but that equality.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _every_rank_computes(count, gather, compute, group):
    """The baseline: every rank gathers and computes every item itself."""
    return [compute(i, gather(i)) for i in range(count)]


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from rankscope.models import get_preset
    from rankscope.optim import GaLoreAdamW
    from rankscope.optim import galore as galore_module

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    config = get_preset(args.preset)
    d, ffn = config.hidden_size, config.intermediate_size
    shapes = [(d, d)] * 4 + [(ffn, d)] * 2 + [(d, ffn)]
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) * 0.02 for _ in range(args.layers) for shape in shapes]
    # LLM-sized gradients (1e-3 scale).
    grads = [torch.randn(w.shape, generator=generator) * 1e-3 for w in weights]

    fsdp = args.parallel == "fsdp"

    def placed(t: torch.Tensor) -> torch.Tensor:
        return distribute_tensor(t.clone(), mesh, [Shard(0)]) if fsdp else t.clone()

    def timed_steps(shared: bool) -> tuple[float, float, list[torch.Tensor]]:
        params = [torch.nn.Parameter(placed(w)) for w in weights]
        optimizer = GaLoreAdamW([{"params": params, "rank": args.rank, "update_proj_gap": 1000, "scale": 0.25}],
                                lr=1e-3, batched=False)
        if shared and not fsdp:
            optimizer.share_work_over(dist.group.WORLD)
        best_refresh, best_between = float("inf"), float("inf")
        for _ in range(args.repeats):
            for state in optimizer.state.values():
                state.clear()
            for p, g in zip(params, grads):
                p.grad = placed(g)
            dist.barrier()
            started = time.perf_counter()
            optimizer.step()  # step 0: a refresh
            dist.barrier()
            best_refresh = min(best_refresh, time.perf_counter() - started)
            started = time.perf_counter()
            optimizer.step()  # step 1: no refresh
            dist.barrier()
            best_between = min(best_between, time.perf_counter() - started)
        projectors = [optimizer.state[p].get("proj_right", optimizer.state[p].get("proj_left")) for p in params]
        return best_refresh, best_between, [p.full_tensor() if hasattr(p, "full_tensor") else p for p in projectors]

    shared_refresh, shared_between, shared_projectors = timed_steps(shared=True)
    real = galore_module.computed_by_one_rank
    if fsdp:
        galore_module.computed_by_one_rank = _every_rank_computes
    try:
        every_refresh, every_between, every_projectors = timed_steps(shared=False)
    finally:
        galore_module.computed_by_one_rank = real
    same = all(torch.equal(a, b) for a, b in zip(shared_projectors, every_projectors))
    if dist.get_rank() == 0:
        print(json.dumps({"parallel": args.parallel, "preset": args.preset, "layers": args.layers, "rank": args.rank, "matrices": len(weights),
                          "shared_refresh_s": shared_refresh, "every_refresh_s": every_refresh,
                          "shared_between_s": shared_between, "every_between_s": every_between,
                          "same_projectors": same}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", choices=("fsdp", "ddp"), default="fsdp")
    parser.add_argument("--preset", default="60m")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", __file__, "--worker",
                           "--parallel", args.parallel, "--preset", args.preset, "--layers", str(args.layers), "--rank", str(args.rank),
                           "--repeats", str(args.repeats)],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-4000:])
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"GaLore refresh under {args.parallel.upper()}, 2 gloo processes, {args.preset} shapes, {row['matrices']} matrices, "
          f"rank {row['rank']} (best of {args.repeats})")
    print(f"{'':28}{'each SVD on one rank':>22}{'every rank every SVD':>22}")
    print(f"{'step with a refresh (s)':28}{row['shared_refresh_s']:>22.3f}{row['every_refresh_s']:>22.3f}")
    print(f"{'step between refreshes (s)':28}{row['shared_between_s']:>22.3f}{row['every_between_s']:>22.3f}")
    print(f"same projectors: {row['same_projectors']}")


if __name__ == "__main__":
    main()
