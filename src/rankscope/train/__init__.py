"""Training: the loop, checkpoints, distributed setup.

Attributes are imported lazily so that `rankscope.train.checkpoint` stays light to import.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "train": "rankscope.train.trainer",
    "LoadedRun": "rankscope.train.setup",
    "evaluate_loss": "rankscope.train.setup",
    "load_run_model": "rankscope.train.setup",
    "read_run_config": "rankscope.train.setup",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rankscope.train' has no attribute {name!r}")
