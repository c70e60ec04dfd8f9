"""Memory accounting from the real tensors of a model and its optimizer.

`estimated_memory_bytes` follows the convention of the LORO / SLTrain tables (Han et al. 2024,
App. C): every weight and every optimizer-state element stored in bf16 (2 bytes), gradients and
activations not counted. Frozen weights (LoRA's W0) count as weights.
"""

from __future__ import annotations

import torch
from torch import nn

LITERATURE_BYTES_PER_ELEMENT = 2


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = []
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors.append(value)
    return tensors


def account_memory(model: nn.Module, optimizer: torch.optim.Optimizer | None, preset: str = "") -> dict:
    params = list(model.parameters())
    buffers = [b for b in model.buffers()]
    state = optimizer_state_tensors(optimizer) if optimizer is not None else []
    n_params = sum(p.numel() for p in params)
    n_state = sum(t.numel() for t in state if t.is_floating_point())
    return {
        "total_params": n_params,
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "frozen_params": sum(p.numel() for p in params if not p.requires_grad),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in buffers),
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in state),
        "optimizer_state_elements": n_state,
        "estimated_memory_bytes": LITERATURE_BYTES_PER_ELEMENT * (n_params + n_state),
    }
