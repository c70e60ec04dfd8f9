"""Every optimizer the benchmark times: ours (both stacking modes, the randomized refresh, GoLore),
the dense SPAM family, torch AdamW and the reference packages where installed."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rankscope.bench.common import wall_and_cpu
from rankscope.bench.optimizer.config import EPS, LR
from rankscope.bench.optimizer.tensors import BenchTensors


def _reference(module: str, attr: str) -> Callable | None:
    """A reference package's optimizer class, or None when the package is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # galore_torch imports bitsandbytes, which warns on CPU
            return getattr(importlib.import_module(module), attr)
    except ImportError:
        return None


@dataclass
class Implementation:
    name: str
    description: str
    family: str | None  # "galore" / "fira": a projected step with that floor; None: AdamW
    build: Callable[[list[torch.Tensor], list[torch.Tensor], int], torch.optim.Optimizer]  # (projected, plain, gap)
    refresh: bool = True  # also time steps that refresh the projector


def implementations(rank: int, scale: float, alpha: float, device: torch.device,
                    oversample: int, niter: int) -> tuple[list[Implementation], list[str]]:
    from rankscope.optim import SPAM, APOLLOAdamW, FiraAdamW, GaLoreAdamW, GoLoreAdamW, StableSPAM

    def groups(projected, plain, gap, extra):
        return [{"params": projected, "rank": rank, "update_proj_gap": gap, "proj_type": "std", **extra},
                {"params": plain}]

    def mini_groups(projected, plain, gap):
        return [{"params": projected, "rank": 1, "update_proj_gap": gap, "proj_type": "std", "scale": 128.0,
                 "proj": "random", "scale_type": "tensor"}, {"params": plain}]

    galore_keys, fira_keys = {"scale": scale}, {"alpha": alpha}
    apollo_keys = {"scale": 1.0, "proj": "random", "scale_type": "channel"}
    randomized = {"svd": "randomized", "svd_oversample": oversample, "svd_niter": niter}
    default_mode = "stacked" if device.type == "cuda" else "per-matrix"
    other_mode = "per-matrix" if device.type == "cuda" else "stacked"
    found = [Implementation("full", "torch.optim.AdamW(foreach=True)", None,
                            lambda pr, pl, gap: torch.optim.AdamW(pr + pl, lr=LR, eps=EPS, foreach=True), False),
             # The dense optimizers of the benchmark: full-size Adam state, no projection (no floor).
             Implementation("spam", "rankscope SPAM (momentum resets, spike clipping)", None,
                            lambda pr, pl, gap: SPAM([{"params": pl}, {"params": pr, "density": 1.0}], lr=LR, eps=EPS),
                            False),
             Implementation("stable-spam", "rankscope StableSPAM (adaptive clipping, norm scaling)", None,
                            lambda pr, pl, gap: StableSPAM(pl + pr, lr=LR, eps=EPS, total_steps=10**6), False)]
    missing = []
    for family, cls, keys, module, attr, package in (
        ("galore", GaLoreAdamW, galore_keys, "galore_torch", "GaLoreAdamW", "galore-torch"),
        ("fira", FiraAdamW, fira_keys, "fira", "FiraAdamW", "fira"),
        ("apollo", APOLLOAdamW, apollo_keys, "apollo_torch", "APOLLOAdamW", "apollo-torch"),
    ):
        found.append(Implementation(
            family, f"rankscope {cls.__name__} ({default_mode})", family,
            lambda pr, pl, gap, cls=cls, keys=keys: cls(groups(pr, pl, gap, keys), lr=LR, eps=EPS)))
        found.append(Implementation(
            f"{family}-{other_mode}", f"rankscope {cls.__name__} ({other_mode})", family,
            lambda pr, pl, gap, cls=cls, keys=keys: cls(groups(pr, pl, gap, keys), lr=LR, eps=EPS,
                                                        batched=other_mode == "stacked"), refresh=False))
        if family == "galore":
            found.append(Implementation(
                "galore-rsvd", f"rankscope GaLoreAdamW, svd_lowrank refresh (q = r + {oversample}, niter {niter})",
                family, lambda pr, pl, gap: GaLoreAdamW(groups(pr, pl, gap, {**galore_keys, **randomized}),
                                                        lr=LR, eps=EPS)))
            # GoLore's random phase: GaLore's step, a Haar draw instead of the gradient's SVD at a refresh.
            found.append(Implementation(
                "golore", f"rankscope GoLoreAdamW, random projectors ({default_mode})", family,
                lambda pr, pl, gap: GoLoreAdamW(groups(pr, pl, gap, {"scale": 1.0, "random_from_step": 0}),
                                                lr=LR, eps=EPS)))
        if family == "apollo":  # APOLLO-Mini: rank 1, one factor per tensor (no floor of its own rank)
            found.append(Implementation(
                "apollo-mini", "rankscope APOLLOAdamW, rank 1, tensor scaling (APOLLO-Mini)", None,
                lambda pr, pl, gap: APOLLOAdamW(mini_groups(pr, pl, gap), lr=LR, eps=EPS, scale_front=True)))
        reference = _reference(module, attr)
        if reference is None:
            missing.append(f"{package} is not installed: pip install {package}")
            continue
        found.append(Implementation(
            f"{family}-ref", f"{module}.{attr} ({package})", family,
            lambda pr, pl, gap, reference=reference, keys=keys: reference(
                groups(pr, pl, gap, keys), lr=LR, eps=EPS, no_deprecation_warning=True)))
    return found, missing


class OptimizerRun:
    """One implementation stepping on its own copy of the weights with the shared gradients."""

    def __init__(self, impl: Implementation, tensors: BenchTensors, gap: int):
        self.projected = [torch.nn.Parameter(w.clone()) for w in tensors.weights]
        self.plain = [torch.nn.Parameter(w.clone()) for w in tensors.plain_weights]
        self.grads = tensors.grads + tensors.plain_grads
        self.optimizer = impl.build(self.projected, self.plain, gap)

    def step(self, device: torch.device) -> tuple[float, float | None]:
        for p, g in zip(self.projected + self.plain, self.grads):
            p.grad = g.clone()  # fresh each step (untimed): no implementation sees another's edits
        return wall_and_cpu(self.optimizer.step, device)



def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
            else:  # the reference packages keep their projector matrices in a Python object
                matrix = getattr(value, "ortho_matrix", None)
                for tensor in matrix if isinstance(matrix, list) else [matrix]:
                    if torch.is_tensor(tensor):
                        total += tensor.numel() * tensor.element_size()
    return total

