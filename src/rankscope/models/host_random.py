"""Random init drawn on the CPU wherever a model is built.

A model built on a GPU (`with torch.device("cuda")`: no fp32 copy in host memory, and an init's
linear algebra, Spectron's SVDs, runs there) would otherwise draw its weights from the GPU's
generator: another init than a CPU build of the same seed, and one that depends on the GPU model
(CUDA's samplers spread a tensor over a grid sized by the number of multiprocessors). Inside
`HostRandomInit()` every draw into a tensor on another device, and every random factory call for
one, is made on the CPU with the CPU's generator (torch.manual_seed) and copied there, one tensor
at a time. The CPU generator then advances exactly as in a CPU build, so the weights are those of
a CPU build bit for bit (values computed from them on the device, such as an SVD, carry that
device's rounding), and the GPU's generator is left untouched for training (dropout).

It works at the level of ATen ops (a TorchDispatchMode), below nn.init and every layer's own
init code, so no layer needs to know about it. A draw given an explicit generator is left alone:
that caller chose where to draw (rankscope.nn.base.seeded_init_ already stages on its device).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that fill their first argument with random values, and factories that return new ones.
_IN_PLACE_DRAWS = frozenset({"uniform_", "normal_", "random_", "bernoulli_", "exponential_", "geometric_",
                             "log_normal_", "cauchy_"})
_FACTORY_DRAWS = frozenset({"rand", "randn", "randint", "randperm"})
_LIKE_DRAWS = frozenset({"rand_like", "randn_like", "randint_like"})


def off_host(device: torch.device) -> bool:
    """Whether draws for a tensor on `device` are redirected: every device holding values but the CPU."""
    return device.type not in ("cpu", "meta")


class HostRandomInit(TorchDispatchMode):
    """Within it, random draws for tensors off the host are made on the CPU and copied over.

    `redirect(device)` says which devices that applies to (tests redirect CPU draws too, to check
    that staging reproduces a draw made in place)."""

    def __init__(self, redirect: Callable[[torch.device], bool] = off_host) -> None:
        super().__init__()
        self.redirect = redirect
        self.redirected = 0  # draws made on the CPU for another device, so far

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if kwargs.get("generator") is None:
            if name in _IN_PLACE_DRAWS and self.redirect(args[0].device):
                target = args[0]
                # The same strides: a sampler fills memory in its own order, so a staging tensor
                # laid out like the target gets the values the target would have got.
                staging = torch.empty_strided(target.shape, target.stride(), dtype=target.dtype, device="cpu")
                func(staging, *args[1:], **kwargs)
                target.copy_(staging)
                self.redirected += 1
                return target
            if name in _FACTORY_DRAWS and kwargs.get("device") is not None:
                device = torch.device(kwargs["device"])
                if self.redirect(device):
                    self.redirected += 1
                    return func(*args, **{**kwargs, "device": torch.device("cpu")}).to(device)
            if name in _LIKE_DRAWS:
                device = torch.device(kwargs.get("device") or args[0].device)
                if self.redirect(device):
                    self.redirected += 1
                    like = torch.empty_like(args[0], device="cpu")  # its shape and dtype are what count
                    return func(like, *args[1:], **{**kwargs, "device": torch.device("cpu")}).to(device)
        return func(*args, **kwargs)
