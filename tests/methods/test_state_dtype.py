"""optim.state_dtype over every registered method under train.precision=bf16-pure.

"fp32" keeps the optimizer's accumulated state (moments, GaLore / Fira / GoLore / APOLLO
projectors, running norms) in fp32 for the bf16 weights; "param" keeps it in bf16, as the official
harnesses do (torch.optim.AdamW and galore_torch create it with `zeros_like` of the bf16 weight or
gradient). Both go through the trainer: config -> resolve_optim -> the method's optimizer, built
after the model is cast to bf16, and written to and read back from a checkpoint.
"""

from __future__ import annotations

import pytest
import torch

from helpers import (  # tests/ is on sys.path (rootdir conftest, no __init__.py)
    TINY_RUN,
    assert_same_weights,
    final_weights,
    train_interrupted,
)
from rankscope import methods
from rankscope.config import build_config
from rankscope.train import checkpoint as ckpt
from rankscope.train.trainer import train

ALL_METHODS = methods.names()
# State that keeps its own dtype under either setting, because its official code keeps it so:
# Spectron's momenta and power-iteration vectors are fp32 (NVIDIA Emerging-Optimizers). Every
# optimizer's "step" counters are fp32 as in torch.optim.AdamW, and integer counters (LORO's
# loro_step, APOLLO's proj_seed) are not floating point.
OWN_DTYPE = {"spectron": {"momentum_buffer", "power_vector"}}
BF16_PURE = ["train.precision=bf16-pure", "data.seq_len=32", "train.batch_size=4"]


def _config(name: str, state_dtype: str, *extra: str):
    """A bf16-pure tiny run of `name` whose periodic work (projector refresh, merge, exact step)
    falls every 2 steps, so it happens before and after a checkpoint."""
    cls = methods.get(name)
    cfg = build_config({}, [*TINY_RUN, f"method.name={name}", f"optim.state_dtype={state_dtype}", *BF16_PURE])
    period = []
    setting = cls.period_setting
    if setting is not None and isinstance(getattr(cfg.method.settings, setting), int) \
            and getattr(cfg.method.settings, setting) > 0:
        period.append(f"method.{setting}=2")
        period += [f"method.{name}=1" for name in cls.warmup_settings
                   if isinstance(getattr(cfg.method.settings, name), int)]
    return build_config({}, [*TINY_RUN, f"method.name={name}", f"optim.state_dtype={state_dtype}", *BF16_PURE,
                             *period, *extra])


def _floating_state(name: str, run_dir) -> dict[str, torch.dtype]:
    """{"<param id>.<key>": dtype} of the accumulated floating state in the run's newest checkpoint."""
    saved = ckpt.load_training_state(ckpt.list_checkpoints(run_dir)[-1].path)["optimizer"]["state"]
    skip = {"step"} | OWN_DTYPE.get(name, set())
    return {f"{param_id}.{key}": value.dtype for param_id, values in saved.items() for key, value in values.items()
            if torch.is_tensor(value) and value.is_floating_point() and key not in skip}


@pytest.mark.parametrize("state_dtype,expected", [("fp32", torch.float32), ("param", torch.bfloat16)])
@pytest.mark.parametrize("name", ALL_METHODS)
def test_state_dtype_reaches_every_methods_optimizer(name, state_dtype, expected, tmp_path):
    cfg = _config(name, state_dtype, "train.steps=3", "train.checkpoint_steps=[3]")
    train(cfg, tmp_path / "run")
    assert final_weights(tmp_path / "run")["embed_tokens.weight"].dtype == torch.bfloat16
    dtypes = _floating_state(name, tmp_path / "run")
    assert any(key.endswith(".exp_avg_sq") for key in dtypes), f"{name}: no second moment in the checkpoint"
    wrong = {key: dtype for key, dtype in dtypes.items() if dtype != expected}
    assert not wrong, f"{name} with optim.state_dtype={state_dtype}: state not in {expected}: {wrong}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_METHODS)
def test_bf16_pure_resume_with_fp32_state_is_bit_identical(name, tmp_path):
    """A crash after step 5 resumes from the step-4 checkpoint and ends on the uninterrupted run's
    weights: the fp32 state comes back from the checkpoint unrounded (torch's own load would cast
    it to the bf16 weights' dtype)."""
    cfg = _config(name, "fp32", "train.steps=8", "train.checkpoint_steps=4")
    train(cfg, tmp_path / "straight")
    train_interrupted(cfg, tmp_path / "resumed", after_step=5)
    summary = train(cfg, tmp_path / "resumed")
    assert summary["resumed_from"] == 4
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"), name)
