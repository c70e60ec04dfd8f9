"""GaLore, GoLore, Fira, LORO and Spectron as methods: build, optimizer groups, training, save/load, resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from helpers import (  # tests/ is on sys.path
    assert_same_weights,
    final_weights,
    train_interrupted,
)
from rankscope import methods
from rankscope.config import build_config
from rankscope.data import prepare_data
from rankscope.errors import ConfigError
from rankscope.methods.base import ResolvedOptim, check_param_groups
from rankscope.models import (
    TARGET_LINEARS,
    build_model,
    dense_state_dict,
    get_preset,
    iter_target_linears,
)
from rankscope.nn import LowRankLinear
from rankscope.train import checkpoint as ckpt
from rankscope.train import load_run_model
from rankscope.train.setup import build_run_model, evaluate_loss
from rankscope.train.trainer import train

METHODS = ["galore", "fira", "loro", "spectron"]
FACTORIZED = ["loro", "spectron"]

# A 20-step run, checkpoint at 8, interrupted after step 12. Every 4 steps a projector refresh
# (GaLore/Fira: updates 1, 5, 9 | 13, 17) or an exact step (LORO: steps 4, 8 | 12, 16, 20)
# happens, so there are some before the checkpoint and some after the interruption.
FREQUENT = {
    "galore": ["method.update_proj_gap=4"],
    # Random projectors from step ceil(0.8 x 20) = 16: the refresh after the resume draws one.
    "golore": ["method.update_proj_gap=4"],
    "fira": ["method.update_proj_gap=4"],
    "loro": ["method.exact_every=4", "method.rewarm_steps=2"],
    "spectron": [],
}
SHORT_RUN = ["data.seq_len=32", "train.batch_size=4", "data.val_sequences=16", "train.steps=20"]


def _tiny_config():
    return dataclasses.replace(get_preset("tiny"), num_layers=2)


def _method(name, **changes):
    cls = methods.get(name)
    model_cfg = _tiny_config()
    settings = dataclasses.replace(cls.default_settings("tiny", model_cfg), **changes)
    return cls(settings, model_cfg, "tiny")


def _optim(cls):
    d = cls.optim_defaults("tiny")
    return ResolvedOptim(lr=d.lr, weight_decay=d.weight_decay, betas=(0.9, 0.999), eps=d.eps,
                         grad_clip=d.grad_clip, total_steps=10, warmup_steps=1, min_lr_ratio=0.1,
                         weight_decay_scope=d.weight_decay_scope)


def _built(name, **changes):
    method = _method(name, **changes)
    method.validate()
    torch.manual_seed(0)
    model = method.parameterize(build_model(method.model_config))
    optimizer = method.build_optimizer(model, _optim(type(method)))
    return method, model, optimizer


# --------------------------------------------------------------------------------------------
# defaults


def test_literature_defaults_per_preset():
    for preset, rank in {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}.items():
        cfg = get_preset(preset)
        for name in METHODS:
            assert methods.get(name).default_settings(preset, cfg).rank == rank, (name, preset)
    tiny, small = get_preset("tiny"), get_preset("20m")
    assert methods.get("galore").default_settings("tiny", tiny).rank == tiny.hidden_size // 4
    assert methods.get("loro").default_settings("20m", small).rank == small.hidden_size // 4
    galore = methods.get("galore").default_settings("60m", get_preset("60m"))
    assert (galore.scale, galore.update_proj_gap, galore.proj_type) == (0.25, 200, "std")
    assert methods.get("fira").default_settings("350m", get_preset("350m")).alpha == 0.25
    assert methods.get("fira").default_settings("1b", get_preset("1b")).alpha == 0.0625
    assert methods.get("loro").default_settings("350m", get_preset("350m")).exact_every == 500
    assert methods.get("loro").default_settings("1b", get_preset("1b")).exact_every == 200
    assert methods.get("loro").default_settings("60m", get_preset("60m")).rewarm_steps == 5
    assert methods.get("spectron").default_settings("60m", get_preset("60m")).momentum == 0.9
    assert methods.get("galore").optim_defaults("60m").lr == 0.01
    assert methods.get("galore").optim_defaults("60m").eps == 1e-6
    assert methods.get("fira").optim_defaults("60m").lr == 0.01
    assert methods.get("loro").optim_defaults("350m").lr == 0.01
    assert methods.get("loro").optim_defaults("1b").lr == 0.005


# --------------------------------------------------------------------------------------------
# building


@pytest.mark.parametrize("name", METHODS)
def test_builds_with_the_right_output_shape_and_param_groups(name):
    method, model, optimizer = _built(name)
    cfg = method.model_config
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    assert model(tokens).shape == (2, 9, cfg.vocab_size)
    check_param_groups(model, optimizer)
    special, *rest = optimizer.param_groups
    plain = {"params": [p for group in rest for p in group["params"]]}
    assert all(not group.get("factor_pairs", False) and "rank" not in group for group in rest)
    targets = [module for _, _, _, module in iter_target_linears(model)]
    assert len(targets) == 2 * len(TARGET_LINEARS)
    names = {id(p): n for n, p in model.named_parameters()}
    if name in ("galore", "fira"):
        assert all(isinstance(m, torch.nn.Linear) for m in targets)  # the model stays dense
        assert [id(p) for p in special["params"]] == [id(m.weight) for m in targets]
        assert special["rank"] == method.settings.rank == cfg.hidden_size // 4
        assert special["update_proj_gap"] == 200 and special["proj_type"] == "std"
        scale_key = "scale" if name == "galore" else "alpha"
        assert special[scale_key] == 0.25
        assert (special["svd"], special["svd_oversample"], special["svd_niter"]) == ("exact", 8, 2)
    else:
        assert all(isinstance(m, LowRankLinear) for m in targets)
        assert special["factor_pairs"] is True
        expected = [id(p) for m in targets for p in (m.B, m.A)]
        assert [id(p) for p in special["params"]] == expected
        if name == "loro":
            assert (special["exact_every"], special["refresh"], special["refresh_every"], special["d_model"]) == (
                500, "all", 500, cfg.hidden_size)
        else:
            assert (special["momentum"], special["ns_coefficients"], special["power_side"]) == (0.9, "quintic", "long")
            # Weight decay: the factors and the embedding / head matrices decay, the norm gains not.
            no_decay = [p for group in rest if group["weight_decay"] == 0.0 for p in group["params"]]
            assert sorted(names[id(p)] for p in no_decay) == sorted(n for n in names.values() if "norm" in n)
    plain_names = sorted(names[id(p)] for p in plain["params"])
    assert "embed_tokens.weight" in plain_names and "lm_head.weight" in plain_names
    assert all("proj" not in n for n in plain_names)


@pytest.mark.parametrize("name", FACTORIZED)
def test_effective_weight_reproduces_the_low_rank_layers(name):
    _, model, _ = _built(name)
    for _, _, _, layer in iter_target_linears(model):
        assert isinstance(layer, LowRankLinear)
        inputs = torch.randn(3, 5, layer.in_features)
        with torch.no_grad():
            dense = inputs @ layer.effective_weight().T
            torch.testing.assert_close(layer(inputs), dense, rtol=1e-5, atol=1e-6)
    # The whole model merged to a plain dense LLaMA computes the same logits.
    dense_model = build_model(_tiny_config())
    dense_model.load_state_dict(dense_state_dict(model))
    tokens = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(dense_model(tokens), model(tokens), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# bad settings


BAD_SETTINGS = [
    ("galore", {"rank": 128}, "below min"),
    ("galore", {"rank": 0}, ">= 1"),
    ("galore", {"update_proj_gap": 0}, "update_proj_gap"),
    ("galore", {"scale": 0.0}, "scale"),
    ("galore", {"proj_type": "diagonal"}, "proj_type"),
    ("galore", {"targets": ["q_prj"]}, "q_proj"),
    ("fira", {"alpha": -0.25}, "alpha"),
    ("fira", {"proj_type": "full"}, "proj_type"),
    ("fira", {"rank": 500}, "below min"),
    ("loro", {"exact_every": 0}, "exact_every"),
    ("loro", {"rank": 128}, "below min"),
    ("loro", {"rewarm_steps": -1}, "rewarm_steps"),
    ("loro", {"rewarm_steps": 600}, "rewarm_steps"),
    ("galore", {"svd": "fast"}, "svd"),
    ("fira", {"svd_niter": -1}, "svd_niter"),
    ("galore", {"svd_oversample": 1.5}, "svd_oversample"),
    ("loro", {"refresh": "lrk"}, "refresh"),
    ("loro", {"refresh_every": 0}, "refresh_every"),
    ("loro", {"schedule": "cosine"}, "schedule"),
    ("loro", {"lr_adjust_ratio": 0.2}, "lr_adjust_ratio"),
    ("loro", {"mlp_rank": 400}, "mlp_rank"),
    ("loro", {"init": "orthogonal"}, "init"),
    ("loro", {"exact_direction": "newton"}, "exact_direction"),
    ("loro", {"targets": []}, "empty"),
    ("spectron", {"momentum": 1.0}, "momentum"),
    ("spectron", {"ns_steps": 0}, "ns_steps"),
    ("spectron", {"ns_steps": 3}, "multiple of 5"),
    ("spectron", {"ns_coefficients": "polar"}, "ns_coefficients"),
    ("spectron", {"ns_precision": "fp16"}, "ns_precision"),
    ("spectron", {"power_iterations": 0}, "power_iterations"),
    ("spectron", {"power_side": "left"}, "power_side"),
    ("spectron", {"targets": ["layers.9.mlp.up_proj"]}, "layers"),
]


@pytest.mark.parametrize(("name", "changes", "match"), BAD_SETTINGS)
def test_bad_settings_raise_config_error(name, changes, match):
    with pytest.raises(ConfigError, match=match):
        _method(name, **changes).validate()


@pytest.mark.parametrize("name", ["galore", "fira"])
def test_randomized_refresh_setting_reaches_the_optimizer(name):
    _, _, optimizer = _built(name, svd="randomized", svd_oversample=4, svd_niter=1)
    special = optimizer.param_groups[0]
    assert (special["svd"], special["svd_oversample"], special["svd_niter"]) == ("randomized", 4, 1)


@pytest.mark.parametrize(("name", "override"), [
    ("galore", "method.rank=128"), ("fira", "method.update_proj_gap=0"),
    ("loro", "method.exact_every=0"), ("spectron", "method.rank=0"),
])
def test_bad_settings_fail_before_training(name, override, tmp_path, tiny_overrides):
    cfg = build_config({}, tiny_overrides + [f"method.name={name}", override, "train.steps=2"])
    with pytest.raises(ConfigError):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing was written: it failed before the run started


# --------------------------------------------------------------------------------------------
# training, save / load, resume


def _run_config(name, tiny_overrides, *extra):
    return build_config({}, tiny_overrides + SHORT_RUN + FREQUENT[name] + [f"method.name={name}", *extra])


@pytest.mark.parametrize("name", METHODS + ["golore"])
def test_trains_saves_loads_and_resumes_bit_identically(name, tmp_path, tiny_overrides):
    cfg = _run_config(name, tiny_overrides, "train.checkpoint_steps=8")
    summary = train(cfg, tmp_path / "straight")
    # Loss falls within 20 steps.
    assert summary["val_loss"] < summary["initial_val_loss"] - 1.0, summary

    # Save / load: the reloaded model gives exactly the validation loss the trainer measured on
    # its in-memory model at the last step, and logits that do not depend on the rebuild's init.
    loaded = load_run_model(tmp_path / "straight")
    assert loaded.step == 20
    val = prepare_data(cfg.data).val
    assert evaluate_loss(loaded.model, val, 16, torch.device("cpu"))["loss"] == summary["val_loss"]
    other, _ = build_run_model(cfg, loaded.model_config, seed=123)
    other.load_state_dict(load_file(str(loaded.checkpoint / "model.safetensors")))
    other.eval()
    tokens = val[:2]
    with torch.no_grad():
        assert torch.equal(other(tokens), loaded.model(tokens))

    # The periodic work really ran. LORO: step 20 was an exact step, whose balanced retraction
    # leaves B^T B = A A^T (diagonal). GaLore / Fira: projectors of the configured rank.
    if name == "loro":
        for _, _, _, layer in iter_target_linears(loaded.model):
            with torch.no_grad():
                gram_b, gram_a = layer.B.T @ layer.B, layer.A @ layer.A.T
            torch.testing.assert_close(gram_b, gram_a, rtol=1e-3, atol=1e-4)
    if name in ("galore", "golore", "fira"):
        state = ckpt.load_training_state(loaded.checkpoint)["optimizer"]["state"]
        projectors = [s.get("proj_right", s.get("proj_left")) for s in state.values() if "proj_right" in s or "proj_left" in s]
        assert len(projectors) == 2 * len(TARGET_LINEARS)
        assert all(cfg.method.settings.rank in p.shape for p in projectors)

    # Resume: interrupt after step 12 (last checkpoint 8), resume, compare final weights bit for bit.
    train_interrupted(cfg, tmp_path / "resumed", after_step=12)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path / "resumed")] == [8]
    resumed = train(cfg, tmp_path / "resumed")
    assert resumed["resumed_from"] == 8
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"), name)


# --------------------------------------------------------------------------------------------
# LORO against its official scripts


def test_loro_schedule_is_the_official_cosine_restart_stepped_after_each_update():
    from rankscope.optim.schedules import loro_cosine_restart

    method = _method("loro", exact_every=5)
    optim = ResolvedOptim(lr=0.01, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-6, grad_clip=0.0,
                          total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    for k in range(1, 101):  # run_c4.py: update k runs at the scheduler's step k - 1, restart every 5
        expected = loro_cosine_restart(k - 1, 100, 10, 0.1, restart_every=5, restart_warmup=5, adjust_steps=-10)
        assert method.lr_multiplier(k, optim) == expected, k
    assert method.lr_multiplier(1, optim) == pytest.approx(0.1)
    assert method.lr_multiplier(6, optim) == pytest.approx(1e-6)  # the update after the first refresh
    ours = _method("loro", exact_every=5, schedule="ours", rewarm_steps=2)
    from rankscope.optim.schedules import cosine_with_warmup

    assert ours.lr_multiplier(6, optim) == pytest.approx(cosine_with_warmup(6, 100, 10, 0.1) / 2)
    assert ours.lr_multiplier(7, optim) == cosine_with_warmup(7, 100, 10, 0.1)


@pytest.mark.slow
def test_loro_refresh_zeroes_every_adam_state_and_the_lr_rewarms_every_group(tmp_path, tiny_overrides):
    """--loro_refresh all: after the exact step at update 8 every tensor's Adam state restarts,
    the embeddings', norms' and head's included, and the next update runs every param group at
    the schedule's restart value (~0): run_c4.py's cosine_restart re-warms all of them."""
    cfg = _run_config("loro", tiny_overrides, "train.steps=40", "train.checkpoint_steps=8,9")
    train(cfg, tmp_path / "run")
    checkpoints = {c.step: c.path for c in ckpt.list_checkpoints(tmp_path / "run")}
    refreshed = ckpt.load_training_state(checkpoints[8])["optimizer"]
    assert len(refreshed["state"]) == sum(len(g["params"]) for g in refreshed["param_groups"])
    for state in refreshed["state"].values():
        assert int(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    after = ckpt.load_training_state(checkpoints[9])["optimizer"]["param_groups"]
    # Each group at its own base lr (the method's, the dense roles' shipped ones) times ~0.
    assert len({g["base_lr"] for g in after}) >= 2
    assert all(g["lr"] == pytest.approx(g["base_lr"] * 1e-6) for g in after)


def test_loro_separate_mlp_rank_and_xavier_normal_factors():
    method, model, optimizer = _built("loro", mlp_rank=16)
    block = model.layers[0]
    assert block.self_attn.q_proj.rank == method.settings.rank == 32 and block.mlp.up_proj.rank == 16
    check_param_groups(model, optimizer)
    # LORO-main's LowRankLinear "xavier" is xavier_normal: N(0, 2 / (fan_in + fan_out)) per factor.
    layer = block.self_attn.q_proj
    samples = torch.cat([layer.B.detach().flatten() / (2.0 / sum(layer.B.shape)) ** 0.5,
                         layer.A.detach().flatten() / (2.0 / sum(layer.A.shape)) ** 0.5])
    assert abs(samples.std().item() - 1) < 0.03
    assert samples.abs().max().item() > 3.0  # normal tails; Xavier-uniform stops at √3


def test_loro_slim_mlp_recipe_builds_a_dense_narrow_mlp_beside_low_rank_attention(tiny_overrides):
    cfg = build_config({}, tiny_overrides + ["method.name=loro", "method.targets=q_proj,k_proj,v_proj,o_proj",
                                             "model.overrides={num_layers: 2, intermediate_size: 32}"])
    model_cfg = dataclasses.replace(get_preset("tiny"), num_layers=2, intermediate_size=32)
    model, method = build_run_model(cfg, model_cfg)
    block = model.layers[0]
    assert isinstance(block.self_attn.q_proj, LowRankLinear) and isinstance(block.mlp.up_proj, torch.nn.Linear)
    assert block.mlp.up_proj.weight.shape == (32, 128)


def test_spectron_starts_from_the_truncated_svd_of_the_dense_init():
    """NVIDIA Spectron._initialize_state: A = U_r √S_r, B = V_r √S_r of the dense parameter."""
    torch.manual_seed(0)
    dense = build_model(_tiny_config())
    _, model, _ = _built("spectron")
    for (_, _, _, linear), (_, _, _, layer) in zip(iter_target_linears(dense), iter_target_linears(model)):
        u, s, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
        r = layer.rank
        best = (u[:, :r] * s[:r]) @ vh[:r]
        torch.testing.assert_close(layer.effective_weight().detach().double(), best, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.B.T.double() @ layer.B.double(), layer.A.double() @ layer.A.T.double(),
                                   rtol=1e-4, atol=1e-6)  # balanced
