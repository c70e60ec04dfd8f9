"""What the content hash of a checkpoint costs: a real 60M (or any preset) model with its AdamW state.

    python benchmarks/checkpoint_hash.py [--preset 60m] [--repeats 3] [--dir /tmp]

Builds the preset's dense LLaMA, takes one AdamW step so the optimizer holds both moments, saves
it as a rankscope checkpoint and prints: the file sizes, the time of a whole save (write, fsync,
hash), of verifying the checkpoint (every file hashed; first from a cold process cache, file
contents in the page cache), of loading it, and the raw throughput of XXH3-128 and SHA-256 on
these files. It asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import torch
import xxhash

from rankscope.models import build_model, get_preset
from rankscope.train import checkpoint as ckpt


def _best(seconds: list[float]) -> str:
    return f"best {min(seconds):.3f} s, median {sorted(seconds)[len(seconds) // 2]:.3f} s"


def _hash_time(path: Path, make) -> float:
    start = time.perf_counter()
    digest = make()
    view = memoryview(bytearray(8 << 20))
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(view):
            digest.update(view[:size])
    digest.hexdigest()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="60m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp folder)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model_cfg = get_preset(args.preset)
    model = build_model(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3  # one step fills exp_avg and exp_avg_sq
    optimizer.step()
    params = sum(p.numel() for p in model.parameters())
    print(f"preset {args.preset}: {params / 1e6:.1f}M parameters, fp32, AdamW state; torch threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory(dir=args.dir) as run_dir:
        training_state = {"optimizer": optimizer.state_dict(), "step": 1}
        saves = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            path = ckpt.save_checkpoint(run_dir, 1, model.state_dict(), training_state, {"note": "bench"})
            saves.append(time.perf_counter() - start)
        files = {name: path / name for name in (ckpt.MODEL_FILE, ckpt.STATE_FILE)}
        total = sum(f.stat().st_size for f in files.values())
        for name, f in files.items():
            print(f"  {name}: {f.stat().st_size / 1e6:.1f} MB")
        print(f"save (write + fsync + hash): {_best(saves)}")

        verifies = []
        for _ in range(args.repeats):
            ckpt._verified.clear()  # as a fresh process would: hash every file again
            start = time.perf_counter()
            ckpt.verify_checkpoint(path)
            verifies.append(time.perf_counter() - start)
        print(f"verify (hash {total / 1e6:.0f} MB, page cache warm): {_best(verifies)}")

        loads = []
        for _ in range(args.repeats):
            ckpt._verified.clear()
            start = time.perf_counter()
            ckpt.load_model_state(path)
            ckpt.load_training_state(path)
            loads.append(time.perf_counter() - start)
        print(f"load model + optimizer state incl. verify: {_best(loads)}")

        for name, make in (("xxh3_128", xxhash.xxh3_128), ("sha256", hashlib.sha256)):
            times = [sum(_hash_time(f, make) for f in files.values()) for _ in range(args.repeats)]
            print(f"{name}: {_best(times)} for {total / 1e6:.0f} MB = {total / min(times) / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
