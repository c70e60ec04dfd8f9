"""FSDP2 vs DDP on the CPU (gloo, 2 processes): training step time, and sharded checkpoint save / load.

    python benchmarks/fsdp_step.py [--presets tiny,20m] [--methods full,galore] [--steps 12]

Launches one `torchrun --nproc_per_node 2` of itself. For each preset and method it trains the
same run under train.parallel=ddp and =fsdp (fp32, no validation between steps, no dynamics) and
reports the median step time over the updates after the first two; then, on the FSDP model after
one update, it times (best of three) a sharded checkpoint's save (torch.distributed.checkpoint, content hashes
and atomic publish included) and load (into a fresh sharded model and optimizer), next to the
unsharded checkpoint's save and load that DDP uses (rank 0 alone writes model.safetensors and
optim.pt). Prints a table; asserts nothing. Timings on a shared machine vary by run: compare
columns of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = ["model.overrides={num_layers: 2}", "data.seq_len=128", "data.val_sequences=16", "data.probe_sequences=16",
       "train.batch_size=8", "train.eval_every=0", "train.log_every=1", "train.dynamics_every=0",
       "train.checkpoint_every=0"]


def _median_step_time(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [row["step_time"] for row in rows if "step_time" in row][2:]  # the first updates warm up
    return statistics.median(times)


def _checkpoint_times(cfg, folder: Path) -> dict[str, float]:
    """Save / load seconds of a sharded checkpoint, and of the unsharded one DDP writes."""
    import torch
    import torch.distributed as dist

    from rankscope.data import prepare_data
    from rankscope.models import token_losses
    from rankscope.train import checkpoint as ckpt
    from rankscope.train.distributed import DistInfo, barrier
    from rankscope.train.setup import build_run_model, build_run_optimizer, resolve_model_config, resolve_optim
    from rankscope.train.sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
    from rankscope.train.sharding import shard_model

    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())
    data = prepare_data(cfg.data)
    model_cfg = resolve_model_config(cfg, data.vocab_size)

    def built(sharded: bool):
        model, method = build_run_model(cfg, model_cfg)
        if sharded:
            shard_model(model, torch.device("cpu"), info.world_size, "fp32")
        return model, build_run_optimizer(method, model, resolve_optim(cfg, type(method)))

    times = {}
    for sharded in (True, False):
        kind = "fsdp" if sharded else "ddp"
        model, optimizer = built(sharded)
        token_losses(model, data.val[:2]).mean().backward()
        optimizer.step()
        fresh_model, fresh_optimizer = built(sharded)
        saves, loads = [], []
        for step in (1, 2, 3):  # the best of three: the first call also sets DCP's machinery up
            run_dir = folder / kind
            barrier(info)
            start = time.perf_counter()
            if sharded:
                save_sharded_checkpoint(run_dir, step, model, optimizer, {"step": step}, {}, info)
            elif info.is_main:  # DDP: rank 0 writes everything
                ckpt.save_checkpoint(run_dir, step, model.state_dict(), {"optimizer": optimizer.state_dict()}, {})
            barrier(info)
            saves.append(time.perf_counter() - start)
            path = ckpt.step_dir(run_dir, step)
            start = time.perf_counter()
            if sharded:
                load_sharded_checkpoint(path, fresh_model, fresh_optimizer)
            else:  # DDP: every rank reads the whole checkpoint
                fresh_model.load_state_dict(ckpt.load_model_state(path))
                fresh_optimizer.load_state_dict(ckpt.load_training_state(path)["optimizer"])
            barrier(info)
            loads.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        times.update({f"{kind}_save_s": min(saves), f"{kind}_load_s": min(loads), f"{kind}_checkpoint_mb": size / 2**20})
    return times


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from rankscope.config import build_config
    from rankscope.train import trainer as trainer_module

    dist.init_process_group("gloo")
    trainer_module.shutdown = lambda info: None  # one process group for every run here
    folder = Path(args.folder)
    results = []
    for preset in args.presets.split(","):
        for method in args.methods.split(","):
            row = {"preset": preset, "method": method}
            for parallel in ("ddp", "fsdp"):
                overrides = RUN + [f"model.preset={preset}", f"method.name={method}", f"train.steps={args.steps}",
                                   f"train.parallel={parallel}"]
                run_dir = folder / f"{preset}_{method}_{parallel}"
                trainer_module.train(build_config({}, overrides), run_dir)
                if dist.get_rank() == 0:
                    row[f"{parallel}_step_s"] = _median_step_time(run_dir)
            cfg = build_config({}, RUN + [f"model.preset={preset}", f"method.name={method}", "train.steps=1"])
            row.update(_checkpoint_times(cfg, folder / f"{preset}_{method}_checkpoints"))
            results.append(row)
    if dist.get_rank() == 0:
        (folder / "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,20m")
    parser.add_argument("--methods", default="full,galore")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    folder = Path(tempfile.mkdtemp(prefix="rankscope-fsdp-bench-"))
    try:
        torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
        command = [torchrun, "--standalone", "--nproc_per_node", "2", __file__, "--worker", "--folder", str(folder),
                   "--presets", args.presets, "--methods", args.methods, "--steps", str(args.steps)]
        subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
        results = json.loads((folder / "results.json").read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    header = (f"{'preset':>7} {'method':>8} {'DDP step':>10} {'FSDP step':>10} {'FSDP/DDP':>9} "
              f"{'ckpt MB':>8} {'DCP save':>9} {'DCP load':>9} {'DDP save':>9} {'DDP load':>9}")
    print(header)
    for row in results:
        print(f"{row['preset']:>7} {row['method']:>8} {row['ddp_step_s'] * 1e3:>8.1f}ms {row['fsdp_step_s'] * 1e3:>8.1f}ms "
              f"{row['fsdp_step_s'] / row['ddp_step_s']:>9.2f} {row['fsdp_checkpoint_mb']:>8.1f} "
              f"{row['fsdp_save_s']:>8.3f}s {row['fsdp_load_s']:>8.3f}s {row['ddp_save_s']:>8.3f}s {row['ddp_load_s']:>8.3f}s")


if __name__ == "__main__":
    main()
