"""Stop a training run at the next step boundary: preemption, a job's time limit, Ctrl-C of a study.

A launcher calls `request_stop()` from a signal handler or another thread; the trainer asks
`stop_requested()` after every step. When the answer is yes it writes a checkpoint of that step,
marked `"preemption": true` in its meta.json (analysis never lists those, and the next regular
checkpoint removes them), and raises `RunPreempted`. The next `train()` of the same run resumes
from that checkpoint bit for bit: weights, optimizer, data position and RNG are all in it.

The flag is per process. Under DDP only one rank may have been signalled, so the ranks agree: each
step all-reduces every rank's vote together with its loss (no collective of its own), and all
ranks stop after the same step. A request that arrives after that all-reduce stops the run one
step later; a single process reads its flag at the end of the step.

A long validation (the initial one, an eval_every one, the final one) checks for a stop before
every batch (under DDP through an all-reduced vote, so every rank leaves it together) and raises
`EvaluationStopped`; the trainer then checkpoints the step without a val loss and stops.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from rankscope.train.distributed import DistInfo, all_reduce_sum

_STOP = threading.Event()


class RunPreempted(Exception):
    """The run stopped early on request after checkpointing `step`; training it again resumes there.
    Step 0: it stopped during its initial validation, before any update (nothing to checkpoint)."""

    def __init__(self, run_dir: str | Path, step: int):
        what = "checkpointed; training it again resumes" if step > 0 else "before its first update; training it again starts it"
        super().__init__(f"run {run_dir} stopped on request after step {step} ({what})")
        self.run_dir = Path(run_dir)
        self.step = step


class EvaluationStopped(Exception):
    """A validation was abandoned because a stop was requested (see `evaluate_loss(stoppable=True)`)."""


def request_stop() -> None:
    _STOP.set()


def clear_stop() -> None:
    _STOP.clear()


def stop_vote() -> float:
    """This process's vote on stopping (1.0 once a stop was requested here), for a tensor the
    ranks all-reduce anyway; `stop_agreed` reads the sum."""
    return 1.0 if _STOP.is_set() else 0.0


def stop_agreed(dist_info: DistInfo, vote_sum: float) -> bool:
    """Whether the ranks stop now, given the all-reduced sum of their `stop_vote()`s. A single
    process has no one to agree with and reads its flag as it is now."""
    if not dist_info.enabled:
        return _STOP.is_set()
    return vote_sum > 0


def stop_requested(dist_info: DistInfo, device: torch.device) -> bool:
    """Whether any rank asked to stop, agreed on with a collective of its own (every rank must call it)."""
    if not dist_info.enabled:
        return _STOP.is_set()
    votes = torch.tensor(stop_vote(), device=device)
    return bool(all_reduce_sum(votes, dist_info) > 0)
