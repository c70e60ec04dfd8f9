"""Stop a training run at the next step boundary: preemption, a job's time limit, Ctrl-C of a study.

A launcher calls `request_stop()` from a signal handler or another thread; the trainer asks
`stop_requested()` after every step. When the answer is yes it writes a checkpoint of that step,
marked `"preemption": true` in its meta.json (analysis never lists those, and the next regular
checkpoint removes them), and raises `RunPreempted`. The next `train()` of the same run resumes
from that checkpoint bit for bit: weights, optimizer, data position and RNG are all in it.

The flag is per process. Under DDP only one rank may have been signalled, so the ranks agree with
an all-reduce and all stop after the same step.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from rankscope.train.distributed import DistInfo, all_reduce_sum

_STOP = threading.Event()


class RunPreempted(Exception):
    """The run stopped early on request after checkpointing `step`; training it again resumes there."""

    def __init__(self, run_dir: str | Path, step: int):
        super().__init__(f"run {run_dir} stopped on request after step {step} (checkpointed; training it again resumes)")
        self.run_dir = Path(run_dir)
        self.step = step


def request_stop() -> None:
    _STOP.set()


def clear_stop() -> None:
    _STOP.clear()


def stop_requested(dist_info: DistInfo, device: torch.device) -> bool:
    if not dist_info.enabled:
        return _STOP.is_set()
    votes = torch.tensor(1.0 if _STOP.is_set() else 0.0, device=device)
    return bool(all_reduce_sum(votes, dist_info) > 0)
