"""Contracts every rankscope optimizer keeps: validation, plain groups == torch AdamW, exact resume."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import pytest
import torch

from rankscope.errors import ConfigError
from rankscope.optim import FiraAdamW, GaLoreAdamW, HyperparameterError, LoroAdamW, SpectronAdamW, state_bytes

OPTIMIZERS = {"galore": GaLoreAdamW, "fira": FiraAdamW, "loro": LoroAdamW, "spectron": SpectronAdamW}


def matrix(*shape: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape))


def pair(d_out: int = 6, r: int = 2, d_in: int = 5) -> list[torch.nn.Parameter]:
    return [matrix(d_out, r), matrix(r, d_in)]


# ----------------------------------------------------------------------------- validation
INVALID = [
    ("negative lr", lambda: GaLoreAdamW([matrix(3, 3)], lr=-1e-3), "learning rate"),
    ("beta1 = 1", lambda: FiraAdamW([matrix(3, 3)], betas=(1.0, 0.999)), "beta1"),
    ("beta2 < 0", lambda: LoroAdamW([matrix(3, 3)], betas=(0.9, -0.1)), "beta2"),
    ("betas not a pair", lambda: SpectronAdamW([matrix(3, 3)], betas=(0.9,)), "betas"),
    ("negative eps", lambda: GaLoreAdamW([matrix(3, 3)], eps=-1.0), "eps"),
    ("negative weight decay", lambda: FiraAdamW([matrix(3, 3)], weight_decay=-0.1), "weight_decay"),
    ("group lr negative", lambda: GaLoreAdamW([{"params": [matrix(3, 3)], "lr": -1.0}]), "learning rate"),
    ("galore rank 0", lambda: GaLoreAdamW([{"params": [matrix(4, 4)], "rank": 0}]), "rank"),
    ("galore rank float", lambda: GaLoreAdamW([{"params": [matrix(4, 4)], "rank": 1.5}]), "rank"),
    ("galore gap 0", lambda: GaLoreAdamW([{"params": [matrix(4, 4)], "rank": 2, "update_proj_gap": 0}]),
     "update_proj_gap"),
    ("galore bad proj_type", lambda: GaLoreAdamW([{"params": [matrix(4, 4)], "rank": 2, "proj_type": "diag"}]),
     "proj_type"),
    ("galore scale 0", lambda: GaLoreAdamW([{"params": [matrix(4, 4)], "rank": 2, "scale": 0.0}]), "scale"),
    ("galore 1-D param", lambda: GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(4))], "rank": 2}]),
     "2-D"),
    ("galore reproject not bool",
     lambda: GaLoreAdamW([{"params": [matrix(4, 4)], "rank": 2, "reproject_moments": "yes"}]), "reproject"),
    ("galore unknown svd", lambda: GaLoreAdamW([{"params": [matrix(4, 4)], "rank": 2, "svd": "qr"}]), "svd"),
    ("galore negative oversample",
     lambda: GaLoreAdamW([{"params": [matrix(4, 4)], "rank": 2, "svd_oversample": -1}]), "svd_oversample"),
    ("fira niter float", lambda: FiraAdamW([{"params": [matrix(4, 4)], "rank": 2, "svd_niter": 1.5}]), "svd_niter"),
    ("galore batched not bool", lambda: GaLoreAdamW([matrix(4, 4)], batched="yes"), "batched"),
    ("fira left rank >= columns",
     lambda: FiraAdamW([{"params": [matrix(6, 4)], "rank": 4, "proj_type": "left"}]), "columns"),
    ("fira negative alpha", lambda: FiraAdamW([{"params": [matrix(4, 4)], "rank": 2, "alpha": -1.0}]), "alpha"),
    ("fira full proj", lambda: FiraAdamW([{"params": [matrix(4, 4)], "rank": 2, "proj_type": "full"}]),
     "proj_type"),
    ("loro K < 1", lambda: LoroAdamW([{"params": pair(), "factor_pairs": True, "exact_every": 0}]),
     "exact_every"),
    ("loro bad refresh", lambda: LoroAdamW([{"params": pair(), "factor_pairs": True, "refresh": "some"}]),
     "refresh"),
    ("loro odd params", lambda: LoroAdamW([{"params": [*pair(), matrix(3, 2)], "factor_pairs": True}]),
     "pairs"),
    ("loro shapes", lambda: LoroAdamW([{"params": [matrix(6, 2), matrix(3, 5)], "factor_pairs": True}]),
     "B (d_out x r)"),
    ("loro lr_scale 0", lambda: LoroAdamW([{"params": pair(), "factor_pairs": True, "lr_scale": 0.0}]),
     "lr_scale"),
    ("loro both scales",
     lambda: LoroAdamW([{"params": pair(), "factor_pairs": True, "lr_scale": 0.5, "d_model": 8}]), "both"),
    ("loro d_model 0", lambda: LoroAdamW([{"params": pair(), "factor_pairs": True, "d_model": 0}]), "d_model"),
    ("loro bad direction",
     lambda: LoroAdamW([{"params": pair(), "factor_pairs": True, "exact_direction": "sgd"}]), "exact_direction"),
    ("spectron momentum 1", lambda: SpectronAdamW([{"params": pair(), "factor_pairs": True, "momentum": 1.0}]),
     "momentum"),
    ("spectron ns_steps 0", lambda: SpectronAdamW([{"params": pair(), "factor_pairs": True, "ns_steps": 0}]),
     "ns_steps"),
]


@pytest.mark.parametrize("build,needle", [(b, n) for _, b, n in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_hyperparameters_are_rejected(build: Callable, needle: str):
    with pytest.raises(HyperparameterError) as info:
        build()
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ConfigError)
    assert "\n" not in str(info.value)


def test_rejected_group_added_later_leaves_optimizer_unchanged():
    optimizer = GaLoreAdamW([matrix(3, 3)])
    with pytest.raises(HyperparameterError):
        optimizer.add_param_group({"params": [matrix(4, 4)], "rank": 0})
    assert len(optimizer.param_groups) == 1


def _signature_defaults(function: Callable, keys=("lr", "betas", "eps", "weight_decay")) -> dict:
    import inspect

    parameters = inspect.signature(function).parameters
    return {key: parameters[key].default for key in keys}


def _official_defaults(name: str) -> dict:
    """The constructor defaults of each optimizer's official code, where the code or docs/methods.md give them."""
    if name == "galore":
        from galore_torch import GaLoreAdamW as Official

        return _signature_defaults(Official.__init__)
    if name == "fira":
        from fira import FiraAdamW as Official

        return _signature_defaults(Official.__init__)
    if name == "loro":  # LOROAdamW (loro_optim.py): HF-style eps 1e-6, no decay (docs/methods.md, loro)
        return {"eps": 1e-6, "weight_decay": 0.0}
    # NVIDIA's Spectron: lr 3e-4 and decoupled weight decay 0.01 (docs/methods.md, spectron); its plain
    # parameters are stepped by torch's AdamW with its betas and eps.
    return {"lr": 3e-4, "weight_decay": 0.01, **_signature_defaults(torch.optim.AdamW.__init__, ("betas", "eps"))}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_defaults_are_the_official_ones(name: str):
    optimizer = OPTIMIZERS[name]([matrix(3, 3)])
    official = _official_defaults(name)
    assert {key: optimizer.defaults[key] for key in official} == official


# ------------------------------------------------ plain groups == torch AdamW / the reference
# LORO's plain groups follow LORO's official optimizer instead (tests/optim/test_optim_loro.py);
# GaLore's and Fira's follow their packages (below).
TORCH_ADAMW_PLAIN = ["spectron"]   # its official code steps plain parameters with torch's AdamW


@pytest.mark.parametrize("name", TORCH_ADAMW_PLAIN)
def test_plain_groups_are_bitwise_torch_adamw(name: str):
    torch.manual_seed(0)
    mine = [matrix(5, 4), torch.nn.Parameter(torch.randn(7))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    initial = [p.detach().clone() for p in mine]
    kwargs = {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    ours = OPTIMIZERS[name](mine, **kwargs)
    reference = torch.optim.AdamW(theirs, **kwargs)
    for _ in range(6):
        grads = [torch.randn_like(p) for p in mine]
        for p, q, g in zip(mine, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        reference.step()
    for p, q in zip(mine, theirs):
        assert torch.equal(p, q)
    assert all(not torch.equal(p, q) for p, q in zip(mine, initial))  # the weights really moved


def _reference_class(name: str) -> type:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import fira
        import galore_torch
    return {"galore": galore_torch.GaLoreAdamW, "fira": fira.FiraAdamW}[name]


@pytest.mark.parametrize("name", ["galore", "fira"])
def test_plain_groups_are_bitwise_the_reference_package(name: str):
    """galore_torch / fira step parameters without a projection with the HF AdamW form (eps
    inside before the bias correction, decay after the update); so do ours, to the bit. A group
    that joins late (other step count) is stepped with its own bias correction."""
    g = torch.Generator().manual_seed(0)
    mine = [torch.nn.Parameter(0.02 * torch.randn(5, 4, generator=g)), torch.nn.Parameter(torch.ones(7)),
            torch.nn.Parameter(0.02 * torch.randn(3, generator=g))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    initial = [p.detach().clone() for p in mine]
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.1}
    ours = OPTIMIZERS[name](mine, **kwargs)
    reference = _reference_class(name)(theirs, no_deprecation_warning=True, **kwargs)
    for step in range(6):
        scale = 10.0 ** -(2 + step % 3)  # 1e-2, 1e-3, 1e-4
        grads = [scale * torch.randn(p.shape, generator=g) for p in mine]
        for index, (p, q, grad) in enumerate(zip(mine, theirs, grads)):
            if index == 2 and step < 2:
                continue  # no gradient yet: this parameter's step count lags the others'
            p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
    for p, q in zip(mine, theirs):
        assert torch.equal(p, q)
    assert all(not torch.equal(p, q) for p, q in zip(mine, initial))


# -------------------------------------------------------------------- resume bit-identical
def _setup(name: str, dtype: torch.dtype, state_dtype: str = "fp32"):
    g = torch.Generator().manual_seed(0)

    def p(*shape: int) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.randn(*shape, generator=g).to(dtype))

    plain = [p(5), p(3, 4)]
    if name in ("galore", "galore-reproject", "galore-randomized", "fira", "fira-stacked"):
        special = [p(10, 6), p(5, 9), p(10, 6)]
        group = {"params": special, "rank": 2, "update_proj_gap": 3}
        if name == "galore-reproject":
            group["reproject_moments"] = True
        if name == "galore-randomized":
            group["svd"] = "randomized"
        cls = FiraAdamW if name.startswith("fira") else GaLoreAdamW
        optimizer = cls([group, {"params": plain}], lr=1e-2, weight_decay=0.05, batched=name == "fira-stacked",
                        state_dtype=state_dtype)
    else:
        special = [p(8, 3) * 0.3, p(3, 6) * 0.3, p(5, 2) * 0.3, p(2, 7) * 0.3]
        special = [torch.nn.Parameter(t.detach()) for t in special]
        if name == "loro":
            group = {"params": special, "factor_pairs": True, "exact_every": 3, "refresh_every": 2, "d_model": 8}
            optimizer = LoroAdamW([group, {"params": plain}], lr=1e-2, weight_decay=0.05, state_dtype=state_dtype)
        else:
            group = {"params": special, "factor_pairs": True}
            optimizer = SpectronAdamW([group, {"params": plain}], lr=1e-2, weight_decay=0.05, state_dtype=state_dtype)
    return special + plain, optimizer


def _grads(params, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


# bf16 weights with both state dtypes: "fp32" state must come back from the checkpoint in fp32
# (torch's own load would round it to the weights' bf16), "param" state in bf16.
RESUME_CASES = [("galore", torch.float32, "fp32"), ("galore-reproject", torch.float32, "fp32"),
                ("galore-randomized", torch.float32, "fp32"), ("fira", torch.float32, "fp32"),
                ("fira-stacked", torch.float32, "fp32"), ("loro", torch.float32, "fp32"),
                ("spectron", torch.float32, "fp32"),
                *[(name, torch.bfloat16, state) for name in ("galore", "galore-reproject", "fira-stacked", "loro", "spectron")
                  for state in ("fp32", "param")]]


@pytest.mark.parametrize("name,dtype,state_dtype", RESUME_CASES,
                         ids=[f"{n}-{str(d)[6:]}-state_{s}" for n, d, s in RESUME_CASES])
def test_resume_through_weights_only_load_is_bit_identical(name: str, dtype: torch.dtype, state_dtype: str):
    total, split = 8, 4   # crosses projector refreshes (gap 3) and LORO exact steps (K 3) + re-warm
    params, optimizer = _setup(name, dtype, state_dtype)
    for step in range(total):
        _grads(params, step)
        optimizer.step()
    uninterrupted = [p.detach().clone() for p in params]

    params, optimizer = _setup(name, dtype, state_dtype)
    for step in range(split):
        _grads(params, step)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "params": [p.detach() for p in params]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    params, optimizer = _setup(name, dtype, state_dtype)
    with torch.no_grad():
        for p, value in zip(params, saved["params"]):
            p.copy_(value)
    optimizer.load_state_dict(saved["optimizer"])
    for step in range(split, total):
        _grads(params, step)
        optimizer.step()
    for a, b in zip(params, uninterrupted):
        assert torch.equal(a, b)
    initial, _ = _setup(name, dtype, state_dtype)
    assert not torch.equal(initial[0], uninterrupted[0])
    moments = [s["exp_avg"] for s in optimizer.state.values() if "exp_avg" in s]
    expected = dtype if state_dtype == "param" else torch.float32
    assert moments and all(m.dtype == expected for m in moments)


@pytest.mark.parametrize("state_dtype,moment_dtype", [("fp32", torch.float32), ("param", torch.bfloat16)])
def test_loro_counters_keep_their_dtype_through_load(state_dtype: str, moment_dtype: torch.dtype):
    params, optimizer = _setup("loro", torch.bfloat16, state_dtype)
    for step in range(4):
        _grads(params, step)
        optimizer.step()
    saved = optimizer.state_dict()
    fresh_params, fresh = _setup("loro", torch.bfloat16, state_dtype)
    fresh.load_state_dict(saved)
    state = fresh.state[fresh_params[0]]
    assert state["loro_step"].dtype == torch.int64 and int(state["loro_step"]) == 4
    assert state["exp_avg"].dtype == moment_dtype
    assert torch.equal(state["exp_avg_sq"], saved["state"][0]["exp_avg_sq"])  # no rounding on the way


# ---------------------------------------------------------------------------- state bytes
def test_state_bytes_counts_real_tensors():
    weight = matrix(12, 8)          # tall: std projects on the right, moments 12 x 3, projector 3 x 8
    vector = torch.nn.Parameter(torch.randn(5))
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 3}, {"params": [vector]}])
    assert state_bytes(optimizer) == 0
    weight.grad, vector.grad = torch.randn(12, 8), torch.randn(5)
    optimizer.step()
    expected = (2 * 12 * 3 + 3 * 8) * 4 + 4 + (2 * 5) * 4 + 4   # fp32 tensors + two fp32 step counters
    assert state_bytes(optimizer) == expected
