"""Helpers shared by the tests (import them as `from helpers import ...`; tests/ is on sys.path)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import pytest
import torch

# The smallest run that still trains: tiny preset cut to 2 layers, short sequences.
TINY_RUN = [
    "model.preset=tiny",
    "model.overrides={num_layers: 2}",
    "data.seq_len=64",
    "data.val_sequences=32",
    "data.probe_sequences=16",
    "train.batch_size=8",
    "train.eval_every=0",
    "train.log_every=5",
]


@contextmanager
def at_step(step: int, action: Callable[[], None]):
    """Call `action` when the trainer reports update `step` as done, before that step's checkpoint
    and `after_step` (raise KeyboardInterrupt there for a crash, `preemption.request_stop` for a
    stop request). The one place the tests reach into the trainer to inject a failure mid-run."""
    from rankscope.train import trainer as trainer_module

    original = trainer_module.ProgressLog.update

    def update(self, done, record, tokens_per_sec):
        if done == step:
            action()
        return original(self, done, record, tokens_per_sec)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module.ProgressLog, "update", update)
        yield


def crash() -> None:
    raise KeyboardInterrupt


def train_interrupted(cfg, run_dir, after_step: int) -> None:
    """Train `cfg` into `run_dir` and crash it (as an unhandled Ctrl-C would) as update `after_step`
    completes: its checkpoint (if one is due) is not written, so a resume starts from the one before."""
    from rankscope.train.trainer import train

    with at_step(after_step, crash), pytest.raises(KeyboardInterrupt):
        train(cfg, run_dir)


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    """The model weights of a run's newest checkpoint."""
    from safetensors.torch import load_file

    from rankscope.train import checkpoint as ckpt

    return load_file(str(ckpt.list_checkpoints(run_dir)[-1].path / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], label: str = "") -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{label}: {key}"


def build_tiny_method(name: str, *, total_steps: int = 1000, warmup_steps: int = 10, seed: int = 0, **changes):
    """(method, model, optimizer, optim) of method `name` on the tiny preset cut to 2 layers, with
    its tiny defaults changed by `changes`, validated, parameterized from a model seeded with `seed`,
    and its optimizer at its literature lr (wd 0, no clipping)."""
    import dataclasses

    from rankscope import methods
    from rankscope.methods.base import ResolvedOptim
    from rankscope.models import build_model, get_preset

    cls = methods.get(name)
    model_cfg = dataclasses.replace(get_preset("tiny"), num_layers=2)
    method = cls(dataclasses.replace(cls.default_settings("tiny", model_cfg), **changes), model_cfg, "tiny")
    method.validate()
    torch.manual_seed(seed)
    model = method.parameterize(build_model(model_cfg))
    defaults = cls.optim_defaults("tiny")
    optim = ResolvedOptim(lr=defaults.lr, weight_decay=0.0, betas=(0.9, 0.999), eps=defaults.eps, grad_clip=0.0,
                          total_steps=total_steps, warmup_steps=warmup_steps, min_lr_ratio=0.1)
    return method, model, method.build_optimizer(model, optim), optim


@contextmanager
def throwaway_method(name: str = "throwaway"):
    """Register a new method (full rank under another name: no tuned entry, no study lists it) for
    the duration of the block: what a contributor's first registry line does."""
    from rankscope import methods
    from rankscope.methods.full import FullRank

    cls = type("Throwaway", (FullRank,), {"name": name, "description": "a method added in a test", "color": None})
    methods.REGISTRY.register(name, cls)
    try:
        yield cls
    finally:
        methods.REGISTRY.unregister(name)
