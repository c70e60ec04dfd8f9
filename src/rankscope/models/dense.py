"""Collapse a (possibly parameterized) LLaMA to the state dict of the plain model."""

from __future__ import annotations

import torch
from torch import nn

from rankscope.errors import NotDenseError  # noqa: F401 - re-exported: its old home


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip torch.compile / DDP wrappers so the keys are those of the bare model."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _is_under(key: str, prefix: str) -> bool:
    return key.startswith(prefix + ".")


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the equivalent plain LlamaModel (same keys as `build_model(cfg).state_dict()`).

    Every module with an `effective_weight()` method (a parameterized linear, duck-typed) is
    emitted as `<name>.weight = effective_weight()`, and its own parameters and buffers are
    dropped; every other entry passes through unchanged. Raises NotDenseError when a layer's
    `effective_weight()` is None (no dense form, e.g. CoLA's nonlinear factorization).
    """
    model = unwrap_model(model)

    # Outermost modules with a dense form; named_modules() lists parents before children.
    merged_weights: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not callable(getattr(module, "effective_weight", None)):
            continue
        if any(_is_under(name, prefix) for prefix in merged_weights):
            continue  # nested inside a layer that is merged as a whole
        with torch.no_grad():
            weight = module.effective_weight()
        if weight is None:
            raise NotDenseError(
                f"layer {name!r} ({type(module).__name__}) has no dense equivalent weight, so this "
                "method's model cannot be exported as a plain LLaMA; evaluate it in rankscope instead"
            )
        merged_weights[name] = weight.detach()

    # Walk the real state dict so the plain entries keep their order; a merged layer's weight
    # takes the place of its first own entry. state_dict() tensors are already detached.
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        owner = next((prefix for prefix in merged_weights if _is_under(key, prefix)), None)
        if owner is None:
            state[key] = tensor
        else:
            state.setdefault(f"{owner}.weight", merged_weights[owner])
    for owner, weight in merged_weights.items():  # a layer whose tensors live elsewhere
        state.setdefault(f"{owner}.weight", weight)
    return state
