"""Shared test setup: one token cache per session, so the embedded corpus is prepared once."""

from __future__ import annotations

import os

import pytest
import torch

# Tiny shapes gain nothing from intra-op threads, and on a busy 2-core machine extra threads
# make small SVDs and matmuls many times slower (measured: 16x on a tiny forward).
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def rankscope_cache(tmp_path_factory):
    cache = os.environ.get("RANKSCOPE_TEST_CACHE") or str(tmp_path_factory.mktemp("rankscope-cache"))
    previous = os.environ.get("RANKSCOPE_CACHE")
    os.environ["RANKSCOPE_CACHE"] = cache
    yield cache
    if previous is None:
        os.environ.pop("RANKSCOPE_CACHE", None)
    else:
        os.environ["RANKSCOPE_CACHE"] = previous


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


@pytest.fixture
def tiny_overrides():
    return list(TINY_RUN)


@pytest.fixture
def lock_holder():
    """Start another process that takes a run folder's lock and keeps it until the test ends."""
    import subprocess
    import sys
    from pathlib import Path

    import rankscope

    holders = []

    def start(run_dir) -> subprocess.Popen:
        src = str(Path(rankscope.__file__).parents[1])
        env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys, time; from rankscope.train.lock import RunLock; "
             "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(300)", str(run_dir)],
            stdout=subprocess.PIPE, text=True, env=env,
        )
        holders.append(holder)
        assert holder.stdout.readline().strip() == "held"
        return holder

    yield start
    for holder in holders:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def train_interrupted(cfg, run_dir, after_step: int) -> None:
    """Train `cfg` into `run_dir` and stop it (as Ctrl-C would) right after update `after_step`."""
    from rankscope.train import trainer as trainer_module
    from rankscope.train.trainer import train

    original = trainer_module.ProgressLog.update

    def interrupt(self, step, record, tps):
        if step == after_step:
            raise KeyboardInterrupt
        return original(self, step, record, tps)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module.ProgressLog, "update", interrupt)
        with pytest.raises(KeyboardInterrupt):
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
