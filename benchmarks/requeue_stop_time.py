"""How long a training run takes from a stop request to its end: what a SLURM job's signal delay
(`--slurm-signal-delay`) must cover before submitit can requeue it.

    python benchmarks/requeue_stop_time.py [--presets tiny,60m] [--threads 1]

For each preset it trains the full-rank method on the embedded corpus in a thread, asks it to stop
(`request_stop`, what `SubmititJob.checkpoint` does on USR2) after a few steps, and times the stop:
the rest of the current step, then writing, fsyncing and hashing the preemption checkpoint (weights
and AdamW state). Prints one line per preset; asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import torch

from rankscope.config import build_config
from rankscope.train import train
from rankscope.train.preemption import RunPreempted, clear_stop, request_stop


def stop_time(preset: str, run_dir: Path, after_steps: int = 2) -> dict:
    cfg = build_config({}, [f"model.preset={preset}", "data.seq_len=128", "data.val_sequences=8",
                            "data.probe_sequences=4", "train.batch_size=4", "train.steps=1000",
                            "train.eval_every=0", "train.log_every=1", "train.checkpoint_steps=[]",
                            "train.dynamics_every=0"])
    outcome: dict = {}

    def run() -> None:
        try:
            train(cfg, run_dir)
        except RunPreempted as exc:
            outcome["step"] = exc.step

    clear_stop()
    worker = threading.Thread(target=run)
    worker.start()
    metrics = run_dir / "metrics.jsonl"
    seen: dict[int, float] = {}  # steps logged -> when they were first seen
    while worker.is_alive() and len(seen) <= after_steps:
        logged = metrics.read_text().count('"loss"') if metrics.is_file() else 0
        seen.setdefault(logged, time.perf_counter())
        if logged >= after_steps:
            break
        time.sleep(0.02)
    step_started = time.perf_counter()
    request_stop()
    worker.join()
    stopped = time.perf_counter() - step_started
    clear_stop()
    [checkpoint] = [p for p in (run_dir / "checkpoints").iterdir() if p.is_dir()]
    size = sum(f.stat().st_size for f in checkpoint.iterdir())
    step_s = seen[after_steps] - seen[after_steps - 1] if after_steps - 1 in seen else float("nan")
    return {"preset": preset, "seconds": stopped, "step": outcome.get("step"), "checkpoint_mb": size / 2**20,
            "step_s": step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,60m")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for preset in args.presets.split(","):
        with tempfile.TemporaryDirectory() as folder:
            row = stop_time(preset, Path(folder) / preset)
        print(f"{row['preset']:>5}: stopped after step {row['step']} and checkpointed {row['checkpoint_mb']:.0f} MiB "
              f"in {row['seconds']:.2f} s from the request (one step: {row['step_s']:.2f} s; {args.threads} thread(s), CPU)",
              flush=True)


if __name__ == "__main__":
    main()
