"""The LLaMA model, its size presets, and helpers shared by methods, training and analysis."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from rankscope.models.dense import NotDenseError, dense_state_dict
from rankscope.models.llama import LlamaConfig, LlamaModel, build_model, count_parameters
from rankscope.models.presets import PRESETS, get_preset

TARGET_LINEARS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")


def iter_target_linears(model: LlamaModel) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """Yield (qualified_name, parent, attr, module) for every projection of every block,
    whatever module sits there now (plain nn.Linear or a replacement)."""
    for index, block in enumerate(model.layers):
        for attr in TARGET_LINEARS:
            parent_name = "self_attn" if attr in _ATTENTION_LINEARS else "mlp"
            parent = getattr(block, parent_name)
            module = getattr(parent, attr, None)
            if module is not None:  # e.g. CoLA without the MLP gate has no gate_proj
                yield f"layers.{index}.{parent_name}.{attr}", parent, attr, module


def token_losses(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross entropy, fp32, shape (B, T-1); logits upcast before the softmax."""
    logits = model(input_ids)
    predictions = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    losses = F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1), reduction="none")
    return losses.view(targets.shape)


__all__ = [
    "LlamaConfig",
    "LlamaModel",
    "PRESETS",
    "get_preset",
    "build_model",
    "count_parameters",
    "TARGET_LINEARS",
    "iter_target_linears",
    "token_losses",
    "dense_state_dict",
    "NotDenseError",
]
