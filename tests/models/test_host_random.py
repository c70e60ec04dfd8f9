"""HostRandomInit: a model built on a GPU draws its init on the CPU, so it is a CPU build's.

Without a GPU the redirection is checked on the CPU itself (every draw staged on a separate CPU
tensor and copied): the values and the generator's position must be those of drawing in place.
The GPU test checks the real thing: a build on CUDA equals a CPU build."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rankscope import methods
from rankscope.config import build_config
from rankscope.models import get_preset
from rankscope.models.host_random import HostRandomInit
from rankscope.train.setup import build_run_model

MODEL = dataclasses.replace(get_preset("tiny"), num_layers=2, vocab_size=256)


def _everywhere(device: torch.device) -> bool:
    return True


@pytest.mark.parametrize("method", methods.names())
def test_staged_draws_give_every_method_the_same_init(method):
    cfg = build_config({}, ["model.preset=tiny", f"method.name={method}"])
    plain, _ = build_run_model(cfg, MODEL)
    generator_after_plain = torch.get_rng_state()
    mode = HostRandomInit(redirect=_everywhere)
    with mode:
        staged, _ = build_run_model(cfg, MODEL)
    assert mode.redirected > 0
    assert torch.equal(torch.get_rng_state(), generator_after_plain)
    expected = plain.state_dict()
    for key, tensor in staged.state_dict().items():
        assert torch.equal(tensor, expected[key]), key


def test_a_strided_target_gets_the_values_drawn_in_place():
    """Samplers fill memory in their own order: a transposed view must get what drawing into it
    directly gives, not the same values in another order."""
    torch.manual_seed(3)
    direct = torch.empty(40, 24).T.normal_()
    torch.manual_seed(3)
    target = torch.empty(40, 24).T
    with HostRandomInit(redirect=_everywhere):
        target.normal_()
    assert torch.equal(target, direct)
    assert not torch.equal(target, direct.contiguous().view(40, 24).T)  # the order does matter


def test_factories_are_drawn_on_the_cpu_and_explicit_generators_left_alone():
    torch.manual_seed(4)
    expected = (torch.randperm(50), torch.rand(3, 5), torch.randn_like(torch.zeros(2, 2)))
    torch.manual_seed(4)
    mode = HostRandomInit(redirect=_everywhere)
    with mode:
        drawn = (torch.randperm(50, device="cpu"), torch.rand(3, 5, device="cpu"), torch.randn_like(torch.zeros(2, 2)))
    assert mode.redirected == 3
    assert all(torch.equal(a, b) for a, b in zip(drawn, expected))
    with mode:
        torch.empty(4).uniform_(generator=torch.Generator().manual_seed(0))
        torch.empty(4, device="meta").normal_()  # no values: nothing to redirect (by default)
    assert mode.redirected == 4  # only the first: a caller's generator is its own choice
    with HostRandomInit() as default:
        torch.empty(4).uniform_()
        torch.empty(4, device="meta").normal_()
    assert default.redirected == 0  # by default only draws for tensors off the CPU move


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", methods.names())
def test_a_model_built_on_the_gpu_is_the_cpu_build(method):
    """Draws are the CPU's, bit for bit; what an init computes from them on the GPU (Spectron's
    SVD of each dense weight) carries the GPU's rounding."""
    cfg = build_config({}, ["model.preset=tiny", f"method.name={method}"])
    on_cpu, _ = build_run_model(cfg, MODEL)
    cuda_state = torch.cuda.get_rng_state()
    on_gpu, _ = build_run_model(cfg, MODEL, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)  # training's GPU stream untouched
    computed = getattr(cfg.method.settings, "init", None) == "dense_svd"
    expected = on_cpu.state_dict()
    for key, tensor in on_gpu.state_dict().items():
        assert tensor.device.type == "cuda", key
        if computed:
            torch.testing.assert_close(tensor.cpu(), expected[key], rtol=1e-4, atol=1e-6, msg=key)
        else:
            assert torch.equal(tensor.cpu(), expected[key]), key
