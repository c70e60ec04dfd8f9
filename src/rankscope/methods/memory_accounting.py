"""Memory accounting from the real tensors of a model and its optimizer.

Two kinds of numbers, kept apart by their names:

- measured: `param_bytes`, `buffer_bytes`, `optimizer_state_bytes` are what the tensors occupy
  now, in their actual dtypes (every state tensor, step counters included).
- literature estimate (`estimated_*`): the convention of the LORO / SLTrain tables (Han et al.
  2024, App. C; LORO Table 1): every weight and every optimizer-state element stored in bf16
  (2 bytes); gradients, activations and buffers not counted. Weights are *all* parameters, frozen
  ones included (LoRA's / ReLoRA's W0). Optimizer-state elements are the floating-point state
  tensors with at least one dimension: Adam moments, momentum buffers, GaLore/Fira projection
  matrices (also reported on their own as `optimizer_state_projector_elements`, since some
  tables leave them out) and power-iteration vectors; scalar counters and norms are left out.
"""

from __future__ import annotations

import torch
from torch import nn

LITERATURE_BYTES_PER_ELEMENT = 2

# State keys holding GaLore-style projection matrices (rankscope.optim.projector).
PROJECTOR_STATE_PREFIX = "proj_"


def _named_state_tensors(optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    out = []
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                out.append((str(key), value))
    return out


def account_memory(model: nn.Module, optimizer: torch.optim.Optimizer | None, preset: str = "") -> dict:
    """Parameter and optimizer-state counts and bytes (`preset` is accepted for callers' symmetry; unused)."""
    params = list(model.parameters())
    buffers = list(model.buffers())
    named_state = _named_state_tensors(optimizer) if optimizer is not None else []
    counted = [(key, t) for key, t in named_state if t.dim() > 0 and t.is_floating_point()]
    n_params = sum(p.numel() for p in params)
    n_state = sum(t.numel() for _, t in counted)
    n_projectors = sum(t.numel() for key, t in counted if key.startswith(PROJECTOR_STATE_PREFIX))
    weight_bytes = LITERATURE_BYTES_PER_ELEMENT * n_params
    state_bytes_estimate = LITERATURE_BYTES_PER_ELEMENT * n_state
    return {
        # parameters (elements)
        "total_params": n_params,
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "frozen_params": sum(p.numel() for p in params if not p.requires_grad),
        # measured bytes, actual dtypes
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in buffers),
        # buffers (SwitchLoRA's candidate vectors, SLTrain's support, RoPE tables): not in the estimate
        "buffer_elements": sum(b.numel() for b in buffers),
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for _, t in named_state),
        # optimizer-state elements counted by the literature estimate
        "optimizer_state_elements": n_state,
        "optimizer_state_projector_elements": n_projectors,
        # literature estimate: bf16 weights (frozen included) + bf16 optimizer states
        "estimated_weight_bytes": weight_bytes,
        "estimated_optimizer_bytes": state_bytes_estimate,
        "estimated_memory_bytes": weight_bytes + state_bytes_estimate,
        "estimated_memory_bytes_without_projectors": weight_bytes
        + LITERATURE_BYTES_PER_ELEMENT * (n_state - n_projectors),
    }
