"""Golden loss curves: the training loss of the first steps of a tiny CPU run per registered method.

Shared by tests/train/test_golden_losses.py (compares) and scripts/regenerate_golden_losses.py
(rewrites tests/assets/golden_losses/<method>.json, on purpose only). Each run is the tiny preset
cut to 1 layer, 32-token sequences, 4 per batch, fp32 on one CPU thread, seed 0, the method's
defaults at `tiny` (its tuned lr where one is shipped) with its periodic work (its
`Method.period_setting`) every PERIOD steps, so that merges, projector refreshes and exact steps
happen inside the curve.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

GOLDEN_DIR = Path(__file__).resolve().parent / "assets" / "golden_losses"
STEPS = 20
PERIOD = 5
# Relative tolerance on each step's loss. Runs on one CPU thread repeat bit for bit (measured: a
# rerun differs by 0.0 for every method), so the bound only absorbs other CPUs / BLAS builds. A
# change of every lr by 1% moves some step's loss by 2.4e-3 (lora, the least) to 1.7e-1 (spam),
# 24x the tolerance or more (torch 2.13 CPU, `scripts/regenerate_golden_losses.py
# --check-lr-sensitivity`, which checks this for every method).
RTOL = 1e-4
REGENERATE = "python scripts/regenerate_golden_losses.py"

RUN = [
    "model.preset=tiny",
    "model.overrides={num_layers: 1}",
    "data.seq_len=32",
    "data.val_sequences=8",
    "data.probe_sequences=4",
    "train.batch_size=4",
    "train.eval_every=0",
    "train.log_every=1",
    f"train.steps={STEPS}",
    "train.checkpoint_steps=[]",
    "train.seed=0",
    "train.device=cpu",
    "train.precision=fp32",
]


def golden_config(method: str, lr_scale: float = 1.0):
    """The run config of `method`'s golden curve; `lr_scale` multiplies every lr it resolves to."""
    from rankscope import methods
    from rankscope.config import build_config
    from rankscope.train.setup import resolve_optim

    cls = methods.get(method)
    cfg = build_config({}, [*RUN, f"method.name={method}"])
    extra = []
    name = cls.period_setting
    if name is not None and isinstance(getattr(cfg.method.settings, name), int) and getattr(cfg.method.settings, name) > 0:
        extra.append(f"method.{name}={PERIOD}")
        for warmup in cls.warmup_settings:
            value = getattr(cfg.method.settings, warmup)
            if isinstance(value, int):
                extra.append(f"method.{warmup}={min(value, PERIOD - 1)}")
    if lr_scale != 1.0:
        optim = resolve_optim(build_config({}, [*RUN, f"method.name={method}", *extra]), cls)
        extra.append(f"optim.lr={optim.lr * lr_scale!r}")
        for role, values in optim.roles.items():
            if "lr" in values:
                extra.append(f"optim.{role}_lr={values['lr'] * lr_scale!r}")
    return build_config({}, [*RUN, f"method.name={method}", *extra])


def golden_losses(method: str, lr_scale: float = 1.0) -> list[float]:
    """The per-step training losses of `method`'s golden run (one CPU thread, as the file was made)."""
    from rankscope.train.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as folder:
            run_dir = Path(folder) / "run"
            train(golden_config(method, lr_scale), run_dir)
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    finally:
        torch.set_num_threads(threads)
    losses = [r["loss"] for r in records if r.get("step", 0) > 0 and "loss" in r]
    assert len(losses) == STEPS, f"{method}: {len(losses)} losses logged, expected {STEPS}"
    return losses


def golden_path(method: str) -> Path:
    return GOLDEN_DIR / f"{method}.json"


def read_golden(method: str) -> dict | None:
    path = golden_path(method)
    return json.loads(path.read_text()) if path.is_file() else None


def write_golden(method: str, losses: list[float]) -> Path:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    path = golden_path(method)
    record = {"method": method, "steps": STEPS, "period": PERIOD, "torch": torch.__version__,
              "config": RUN, "loss": losses}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def max_relative_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))
