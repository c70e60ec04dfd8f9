"""`rankscope demo`: the packaged demo study, run end to end on the embedded corpus and a CPU."""

from __future__ import annotations

import time
from pathlib import Path

from rankscope.study import LaunchOptions, load_study, run_study

STUDIES_DIR = Path(__file__).resolve().parent / "studies"


def demo_study_file(quick: bool) -> Path:
    return STUDIES_DIR / ("demo-quick.yaml" if quick else "demo.yaml")


def run_demo(out_dir: str | Path = "rankscope-demo", quick: bool = False, device: str | None = None,
             launch: LaunchOptions | None = None) -> dict:
    """Run the demo study; `launch` picks the launcher and `workers` (default: local, one per core)."""
    spec = load_study(demo_study_file(quick))
    if device:
        spec.base.setdefault("train", {})["device"] = device
        spec.analysis["device"] = device
        spec.eval.device = device
    started = time.perf_counter()
    result = run_study(None, out_dir, spec=spec, launch=launch)
    result["wall_time"] = time.perf_counter() - started
    return result
