"""Activation checkpointing (train.activation_checkpointing): the same loss and gradients for every
method's parameterization, with each block keeping only its input for the backward pass."""

from __future__ import annotations

import pytest
import torch

from helpers import build_tiny_method  # tests/ is on sys.path
from memory_probe import cpu_bytes
from rankscope import methods
from rankscope.models import LlamaConfig, build_model, token_losses


def _loss_and_grads(model, ids, recompute: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.activation_checkpointing = recompute
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # the same dropout draws (LoRA's adapters) in both passes
    loss = token_losses(model, ids).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", methods.names())
def test_recomputed_blocks_give_the_same_loss_and_gradients(method):
    _, model, _, _ = build_tiny_method(method)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    loss, grads = _loss_and_grads(model, ids, recompute=False)
    recomputed_loss, recomputed_grads = _loss_and_grads(model, ids, recompute=True)
    assert grads, method
    assert recomputed_grads.keys() == grads.keys()
    # The recompute runs the same ops on the same values, so on one CPU thread nothing moves.
    torch.testing.assert_close(recomputed_loss, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(recomputed_grads[name], grad, rtol=1e-6, atol=1e-9, msg=name)


def _retained_after_forward(num_layers: int, recompute: bool, batch: int, seq_len: int, hidden: int) -> int:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=176, num_heads=4,
                         num_layers=num_layers, max_seq_len=seq_len)
    model = build_model(config)
    model.activation_checkpointing = recompute
    ids = torch.randint(0, 97, (batch, seq_len))
    measured = cpu_bytes(lambda: token_losses(model, ids).mean())
    measured.result.backward()
    return measured.retained


def test_a_recomputed_block_keeps_only_its_input():
    """What the forward leaves for the backward pass, per block (4 extra blocks, measured from
    torch's allocation records): without checkpointing every intermediate of attention and the
    MLP; with it only the block's input, B·T·H fp32 values, plus the CPU RNG state it saves so
    the recompute replays dropout."""
    batch, seq_len, hidden = 4, 64, 64
    per_block = {recompute: (_retained_after_forward(8, recompute, batch, seq_len, hidden)
                             - _retained_after_forward(4, recompute, batch, seq_len, hidden)) / 4
                 for recompute in (False, True)}
    block_input = batch * seq_len * hidden * 4
    rng_state = torch.get_rng_state().numel()
    assert per_block[True] == pytest.approx(block_input + rng_state, abs=1024)
    assert per_block[False] > 15 * per_block[True]
