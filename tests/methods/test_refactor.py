"""Weight refactorization with momentum reset (lowrank, sltrain), against the official code
(OptimAI-Lab/Memory_Efficient_Pretraining @9f803d4: para_eff_pt/pt_sltrain/splora_model.py L309-341
`merge_and_reinit`, torchrun_main_DDP.py L756-796, para_eff_pt/peft_pretraining/training_utils.py
L247-302 `_get_cosine_schedule_with_quick_recovery_lambda`)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import (  # tests/ is on sys.path
    TINY_RUN,
    assert_same_weights,
    build_tiny_method,
    final_weights,
    train_interrupted,
)
from rankscope.config import build_config
from rankscope.errors import ConfigError
from rankscope.methods.refactor import refactor_factors
from rankscope.nn import LowRankLinear, SparsePlusLowRankLinear
from rankscope.optim.schedules import cosine_with_warmup
from rankscope.train.trainer import train


def _factors(m=48, n=32, r=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Unbalanced, as training leaves them: B large, A small.
    return 0.5 * torch.randn(m, r, generator=g), 0.01 * torch.randn(r, n, generator=g)


def _official_merge_and_reinit(B, A):
    """splora_model.py merge_and_reinit, step by step."""
    W = (B @ A).float()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    r = A.shape[0]
    root = torch.sqrt(S[:r])
    return U[:, :r] @ torch.diag(root), torch.diag(root) @ Vh[:r, :]


def test_refactor_keeps_the_product_balances_the_factors_and_matches_the_official_step():
    B, A = _factors()
    product = B @ A
    official_B, official_A = _official_merge_and_reinit(B, A)
    refactor_factors(B, A)
    torch.testing.assert_close(B @ A, product, rtol=1e-5, atol=1e-7)
    sigma = torch.linalg.svdvals(product)[:6]
    torch.testing.assert_close(B.T @ B, torch.diag(sigma), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(A @ A.T, torch.diag(sigma), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(B, official_B, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(A, official_A, rtol=1e-6, atol=1e-7)


def _built(name, **changes):
    """The method after one optimizer step (so its optimizer has state), and the tokens it saw."""
    method, model, optimizer, optim = build_tiny_method(name, warmup_steps=100, **changes)
    tokens = torch.randint(0, method.model_config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    model(tokens).float().square().mean().backward()
    optimizer.step()
    return method, model, optimizer, optim, tokens


@pytest.mark.parametrize("name,layer_type", [("lowrank", LowRankLinear), ("sltrain", SparsePlusLowRankLinear)])
@pytest.mark.parametrize("mode", ["all", "factors", "none"])
def test_after_step_refactors_every_layer_and_clears_exactly_the_state_it_should(name, layer_type, mode):
    method, model, optimizer, _, tokens = _built(name, refactor_every=4, reset_optimizer=mode)
    layers = [m for m in model.modules() if isinstance(m, layer_type)]
    factors = {id(p) for layer in layers for p in (layer.B, layer.A)}
    with torch.no_grad():
        before = model(tokens)
        products = [layer.B @ layer.A for layer in layers]
    sparse = [layer.sparse_values.clone() for layer in layers] if name == "sltrain" else []
    method.after_step(3, model, optimizer)  # not a refactor point: nothing happens
    assert len(optimizer.state) == sum(1 for g in optimizer.param_groups for _ in g["params"])
    method.after_step(4, model, optimizer)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), before, rtol=1e-4, atol=1e-5)  # the function is unchanged
        for layer, product in zip(layers, products):
            torch.testing.assert_close(layer.B @ layer.A, product, rtol=1e-4, atol=1e-6)
            gram = layer.A @ layer.A.T  # = diag(σ_r) after the refactor, as is BᵀB
            torch.testing.assert_close(layer.B.T @ layer.B, gram, rtol=1e-3, atol=1e-5 * float(gram.diagonal().max()))
    for layer, values in zip(layers, sparse):
        assert torch.equal(layer.sparse_values, values)  # SLTrain's sparse part is not touched
    kept = {id(p) for p in optimizer.state}
    everything = {id(p) for g in optimizer.param_groups for p in g["params"]}
    expected = {"all": set(), "factors": everything - factors, "none": everything}[mode]
    assert kept == expected


def test_no_refactor_after_the_last_update_or_when_off():
    method, model, optimizer, _, _ = _built("lowrank", refactor_every=500)
    assert method.is_refactor_step(500) and not method.is_refactor_step(1000) and not method.is_refactor_step(250)
    off, *_ = _built("lowrank")
    assert not any(off.is_refactor_step(s) for s in range(1, 1001))


def test_quick_recovery_windows_follow_the_official_lambda():
    method, _, _, optim, _ = _built("lowrank", refactor_every=100)

    def cosine(step):
        return cosine_with_warmup(step, 1000, 100, 0.1)

    def official(current_step, restart_every=100, recovery_steps=10):
        last = current_step // restart_every * restart_every
        since = current_step - last
        if since < recovery_steps:
            target = cosine(last + recovery_steps)
            return target * 0.001 + (target - target * 0.001) * min(1.0, since / (recovery_steps - 1))
        return cosine(current_step)

    # Up to the first refactor (after update 100) the run's cosine; afterwards the official
    # schedule, re-created with last_epoch = 100, so update k gets its value at k.
    for step in (1, 50, 99, 100):
        assert method.lr_multiplier(step, optim) == cosine(step)
    for step in range(101, 1001):
        assert method.lr_multiplier(step, optim) == pytest.approx(official(step), rel=1e-12), step
    assert method.lr_multiplier(101, optim) == pytest.approx((0.001 + 0.999 / 9) * cosine(110))  # 0.112 x
    assert method.lr_multiplier(109, optim) == pytest.approx(cosine(110))
    assert method.lr_multiplier(200, optim) == pytest.approx(0.001 * cosine(210))  # the official quirk at later points
    assert not math.isclose(method.lr_multiplier(101, optim), cosine(101))


@pytest.mark.parametrize(("changes", "match"), [
    ({"refactor_every": -1}, "refactor_every"), ({"reset_optimizer": "moments"}, "reset_optimizer"),
    ({"recovery_steps": -2}, "recovery_steps"), ({"recovery_floor": 2.0}, "recovery_floor"),
])
def test_bad_settings_name_the_setting(changes, match):
    with pytest.raises(ConfigError, match=match):
        _built("sltrain", **changes)


@pytest.mark.parametrize("name", ["lowrank", "sltrain"])
def test_resume_across_refactors_is_bit_identical(name, tmp_path):
    cfg = build_config({}, TINY_RUN + [f"method.name={name}", "method.refactor_every=3", "method.recovery_steps=2",
                                       "train.steps=10", "train.checkpoint_steps=6", "data.seq_len=32",
                                       "train.batch_size=4"])
    train(cfg, tmp_path / "straight")
    train_interrupted(cfg, tmp_path / "resumed", after_step=8)
    assert train(cfg, tmp_path / "resumed")["resumed_from"] == 6  # refactor at 6 replayed after the load, 9 after
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"), name)
