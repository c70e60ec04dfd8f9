"""`state_dtype` of every rankscope optimizer on bf16 weights (train.precision=bf16-pure).

"param" is what torch.optim.AdamW and the official harnesses do (state created with `zeros_like`
of the bf16 weight or gradient): Adam's second moment then cannot decay, since v * 0.999 rounds
back to v in bf16 (a relative change of 1e-3 is below bf16's half-ulp, 2^-9). "fp32" keeps the
accumulated state in fp32 and must give exactly the state an fp32 run would hold.

Realistic inputs: weights at 0.02, gradients of 1e-5 .. 1e-2, production eps (1e-8 / 1e-6).
"""

from __future__ import annotations

import pytest
import torch

from rankscope.optim import (
    SPAM,
    AdamW,
    APOLLOAdamW,
    FiraAdamW,
    GaLoreAdamW,
    GoLoreAdamW,
    LoroAdamW,
    RowStepAdamW,
    SpectronAdamW,
    StableSPAM,
)
from rankscope.optim._base import upcast_adamw_step

BETA2 = 0.999
BF16_ULP_HALF = 2.0**-9


# -------------------------------------------------------------- the evidence's bf16 ratchet
def _constant_gradient_run(build, state_dtype: str, shape: tuple[int, ...] = (8, 4)):
    """100 steps of g = 1, then 1900 steps of g = 0.01 (rounded to bf16, as a bf16 weight's gradient
    is), on one bf16 weight; returns the optimizer and the weight."""
    weight = torch.nn.Parameter(torch.full(shape, 0.02, dtype=torch.bfloat16))
    optimizer = build(weight, state_dtype)
    for step in range(2000):
        weight.grad = torch.full_like(weight, 1.0 if step < 100 else 0.01)
        optimizer.step()
    return optimizer, weight


# (optimizer over one 8 x 4 weight, the factor by which its second moment sees g): plain groups
# see g itself; a rank-1 GaLore / Fira projection of the constant matrix g·1 1ᵀ (right side, the
# SVD's v = 1/sqrt(4)) sees R = G vᵀ = 2g in every row.
RATCHET_CASES = {
    "AdamW": (lambda w, s: AdamW([w], lr=1e-3, weight_decay=0.0, state_dtype=s), 1.0),
    "GaLoreAdamW plain group": (lambda w, s: GaLoreAdamW([w], lr=1e-3, state_dtype=s), 1.0),
    "GaLoreAdamW projected": (lambda w, s: GaLoreAdamW([{"params": [w], "rank": 1}], lr=1e-3, state_dtype=s), 2.0),
    "FiraAdamW projected": (lambda w, s: FiraAdamW([{"params": [w], "rank": 1}], lr=1e-3, state_dtype=s), 2.0),
    "LoroAdamW plain group": (lambda w, s: LoroAdamW([w], lr=1e-3, state_dtype=s), 1.0),
    "SPAM": (lambda w, s: SPAM([w], lr=1e-3, reset_every=0, spike_threshold=0.0, state_dtype=s), 1.0),
    "RowStepAdamW plain group": (lambda w, s: RowStepAdamW([w], lr=1e-3, state_dtype=s), 1.0),
    "RowStepAdamW step_axis group": (lambda w, s: RowStepAdamW([{"params": [w], "step_axis": 0}], lr=1e-3,
                                                               state_dtype=s), 1.0),
    "SpectronAdamW plain group": (lambda w, s: SpectronAdamW([w], lr=1e-3, weight_decay=0.0, state_dtype=s), 1.0),
}


@pytest.mark.parametrize("case", list(RATCHET_CASES))
def test_second_moment_of_bf16_weights_decays_only_with_fp32_state(case):
    """The audit's repro (evidence/gpu-cluster-readiness.md #4): exp_avg_sq after the switch from
    g = 1 to g = 0.01 against the fp32 closed form v = (1 - b2^100) b2^1900 (k·1)² + (1 - b2^1900) (k·g)²."""
    build, k = RATCHET_CASES[case]
    g_late = float(torch.tensor(0.01, dtype=torch.bfloat16))  # 0.010009765625: what a bf16 weight's gradient holds
    closed_form = (1 - BETA2**100) * BETA2**1900 * k**2 + (1 - BETA2**1900) * (k * g_late) ** 2  # 0.01431 for k=1

    optimizer, weight = _constant_gradient_run(build, "fp32")
    v = optimizer.state[weight]["exp_avg_sq"]
    assert v.dtype == torch.float32
    # 2000 fp32 recursions round ~4000 times: measured 2.8e-5 relative from the closed form.
    torch.testing.assert_close(v, torch.full_like(v, closed_form), rtol=1e-4, atol=0.0)

    optimizer, weight = _constant_gradient_run(build, "param")
    v = optimizer.state[weight]["exp_avg_sq"]
    assert v.dtype == torch.bfloat16
    # The ratchet: v stopped decaying near 0.098 k² (the audit measured 0.0981 for torch's AdamW).
    assert (v.float() > 5 * closed_form).all(), f"{case}: {v.flatten()[:4]} vs closed form {closed_form:.5f}"


def test_a_relative_change_below_half_a_bf16_ulp_is_lost():
    """Why: 1 - 0.999 = 1e-3 < 2^-9, so v * 0.999 rounds back to v."""
    assert 1 - BETA2 < BF16_ULP_HALF
    assert torch.equal(torch.tensor([1.0], dtype=torch.bfloat16) * BETA2, torch.tensor([1.0], dtype=torch.bfloat16))


# ------------------------------------------------- fp32 state == an fp32 run's state, exactly
def _matrix(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return 0.02 * torch.randn(rows, cols, generator=generator)


def _pairs(generator):  # LORO / Spectron factor pairs [B0, A0, B1, A1]
    return [_matrix(12, 3, generator), _matrix(3, 8, generator), _matrix(10, 2, generator), _matrix(2, 6, generator)]


# name -> (build(params, state_dtype), initial tensors, the state keys that depend on the weights
# rather than only on the gradients: not compared). Weight decay 0 throughout, so the moments of
# every optimizer are a function of the gradients alone.
def _cases():
    def matrices(g):
        return [_matrix(12, 8, g), _matrix(6, 10, g), 0.02 * torch.randn(7, generator=g)]

    projected = {"rank": 2, "update_proj_gap": 3}
    return {
        "AdamW": (lambda ps, s: AdamW(ps, lr=1e-3, weight_decay=0.0, state_dtype=s), matrices, ()),
        "GaLoreAdamW": (lambda ps, s: GaLoreAdamW([{"params": ps[:2], **projected}, {"params": ps[2:]}],
                                                  lr=1e-2, state_dtype=s), matrices, ()),
        "GaLoreAdamW stacked": (lambda ps, s: GaLoreAdamW([{"params": ps[:2], **projected}, {"params": ps[2:]}],
                                                          lr=1e-2, batched=True, state_dtype=s), matrices, ()),
        "GoLoreAdamW": (lambda ps, s: GoLoreAdamW([{"params": ps[:2], **projected, "random_from_step": 3},
                                                   {"params": ps[2:]}], lr=1e-2, state_dtype=s), matrices, ()),
        "FiraAdamW": (lambda ps, s: FiraAdamW([{"params": ps[:2], **projected}, {"params": ps[2:]}],
                                              lr=1e-2, state_dtype=s), matrices, ()),
        "APOLLOAdamW": (lambda ps, s: APOLLOAdamW([{"params": ps[2:]}, {"params": ps[:2], **projected}],
                                                  lr=1e-2, state_dtype=s), matrices, ()),
        "APOLLOAdamW tensor scaling": (lambda ps, s: APOLLOAdamW(
            [{"params": ps[2:]}, {"params": ps[:2], **projected, "rank": 1, "scale_type": "tensor"}],
            lr=1e-2, state_dtype=s), matrices, ()),
        "LoroAdamW": (lambda ps, s: LoroAdamW([{"params": ps, "factor_pairs": True, "exact_every": 3,
                                                "refresh_every": 4}], lr=1e-2, state_dtype=s), _pairs, ()),
        "SpectronAdamW": (lambda ps, s: SpectronAdamW([{"params": ps[:2], "factor_pairs": True}, {"params": ps[2:]}],
                                                      lr=1e-2, weight_decay=0.0, state_dtype=s), _pairs,
                          ("power_vector",)),
        "SPAM": (lambda ps, s: SPAM(ps, lr=1e-3, reset_every=4, spike_threshold=50.0, reset_warmup=2, clip_start=2,
                                    state_dtype=s), matrices, ()),
        "StableSPAM": (lambda ps, s: StableSPAM(ps, lr=1e-3, total_steps=6, reset_every=4, state_dtype=s),
                       matrices, ()),
        "RowStepAdamW": (lambda ps, s: RowStepAdamW([{"params": ps[:1], "step_axis": 0}, {"params": ps[1:]}],
                                                    lr=1e-3, state_dtype=s), matrices, ()),
    }


CASES = _cases()


def _run(name: str, dtype: torch.dtype, state_dtype: str, steps: int = 6):
    build, initial, _ = CASES[name]
    generator = torch.Generator().manual_seed(0)
    # bf16 values for both runs: their weights start equal (only the state is compared, though).
    params = [torch.nn.Parameter(t.to(torch.bfloat16).to(dtype)) for t in initial(generator)]
    optimizer = build(params, state_dtype)
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        for p in params:
            scale = 10.0 ** -float(torch.empty(()).uniform_(2.0, 5.0, generator=g))  # 1e-5 .. 1e-2
            # bf16 values, so the bf16 and the fp32 run receive the same gradients
            p.grad = (scale * torch.randn(p.shape, generator=g)).to(torch.bfloat16).to(dtype)
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_state_of_bf16_weights_is_the_state_of_an_fp32_run(name):
    """Bit for bit: the bf16 gradients are widened exactly, and every accumulated tensor (moments,
    projectors, running norms, Fira / APOLLO limiter norms) is computed as in the fp32 run."""
    weight_dependent = CASES[name][2]
    params16, bf16_run = _run(name, torch.bfloat16, "fp32")
    params32, fp32_run = _run(name, torch.float32, "fp32")
    compared = 0
    for p16, p32 in zip(params16, params32):
        for key, value in bf16_run.state[p16].items():
            if not value.is_floating_point() or key in weight_dependent:
                continue
            assert value.dtype == torch.float32, f"{name}: {key} is {value.dtype}"
            assert torch.equal(value, fp32_run.state[p32][key]), f"{name}: {key} differs from the fp32 run's"
            compared += 1
    assert compared >= 2 * len(params16)


@pytest.mark.parametrize("name", list(CASES))
def test_param_state_of_bf16_weights_is_bf16(name):
    """"param" is the official harnesses' state, bit for bit (the golden bf16-pure runs checked this
    against the code before the setting existed): moments and projectors in the weights' dtype."""
    own_dtype = {"SpectronAdamW": {"momentum_buffer", "power_vector"}}.get(name, set())  # fp32, as NVIDIA's
    params, optimizer = _run(name, torch.bfloat16, "param")
    dtypes = {key: value.dtype for p in params for key, value in optimizer.state[p].items()
              if value.is_floating_point() and key != "step" and key not in own_dtype}
    assert dtypes and set(dtypes.values()) == {torch.bfloat16}, dtypes


# ------------------------------------------------------------------ the widened AdamW step
def test_upcast_step_is_torch_adamws_formula():
    """On fp32 tensors the widened path is torch's single-tensor AdamW, bit for bit (CPU)."""
    g = torch.Generator().manual_seed(0)
    ours, theirs = torch.nn.Parameter(_matrix(6, 5, g)), torch.nn.Parameter(torch.empty(6, 5))
    theirs.data.copy_(ours.data)
    group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
    state = {"step": torch.tensor(0.0), "exp_avg": torch.zeros(6, 5), "exp_avg_sq": torch.zeros(6, 5)}
    reference = torch.optim.AdamW([theirs], foreach=False, **group)
    for _ in range(5):
        grad = 1e-3 * torch.randn(6, 5, generator=g)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        upcast_adamw_step(ours, state, group)
        reference.step()
    assert torch.equal(ours, theirs)
    assert torch.equal(state["exp_avg_sq"], reference.state[theirs]["exp_avg_sq"])


def test_bf16_weight_takes_the_fp32_update_rounded_once():
    """With fp32 moments the update m / (sqrt(v) + eps) is computed in fp32 and rounded into the bf16
    weight as it is added, after the decay (rounded as torch rounds p *= 1 - lr·wd)."""
    g = torch.Generator().manual_seed(1)
    weight = torch.nn.Parameter(_matrix(6, 5, g).to(torch.bfloat16))
    optimizer = AdamW([weight], lr=1e-3, weight_decay=0.1, eps=1e-8, state_dtype="fp32")
    weight.grad = (1e-3 * torch.randn(6, 5, generator=g)).to(torch.bfloat16)
    before = weight.detach().clone()
    optimizer.step()
    grad = weight.grad.float()
    m, v = 0.1 * grad, 0.001 * grad * grad
    update = (m / ((v.sqrt() / (1 - 0.999) ** 0.5) + 1e-8)) * (1e-3 / (1 - 0.9))
    decayed = (before * (1 - 1e-3 * 0.1)).float()
    torch.testing.assert_close(weight, (decayed - update).to(torch.bfloat16), rtol=0, atol=0)
