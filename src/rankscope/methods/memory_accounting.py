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

Activations (for `rankscope methods --memory`'s training estimate): `saved_activation_bytes`
counts the tensors autograd keeps for the backward of one forward of a model, block by block
(exact: a saved-tensor hook sees every one; works on the meta device), and
`dense_activation_bytes` is the same count written out from the LLaMA block's code, the formula
the hook count is checked against (tests/methods/test_memory.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
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


# ------------------------------------------------------------------------------ activations
@contextlib.contextmanager
def flash_attention_kernel() -> Iterator[None]:
    """Within the block, causal attention without a mask or dropout runs the flash kernel's op,
    whose autograd node keeps what the GPU flash and memory-efficient kernels keep: q, k, v, the
    output and an fp32 log-sum-exp per head and token. On the meta device the composite
    `F.scaled_dot_product_attention` takes the math path instead and keeps the T x T attention
    matrix, which no GPU run holds."""
    original = F.scaled_dot_product_attention

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or dropout_p or kwargs:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _storage_key(t: torch.Tensor) -> int:
    # The storage's identity (its StorageImpl), also on the meta device, where every data pointer
    # is 0. Views and the several ops that save one tensor then count once.
    return t.untyped_storage()._cdata


def saved_activation_bytes(model: nn.Module, input_ids: torch.Tensor) -> dict:
    """Bytes of the tensors autograd keeps for the backward of the training loss on `input_ids`
    (`rankscope.models.token_losses`, mean), each storage once, the model's parameters and buffers
    left out (they are the weights). Attention is counted as the flash kernels keep it
    (`flash_attention_kernel`). Runs on real tensors or on the meta device (shapes only).

    Returns {"blocks": bytes first kept inside each decoder layer (the model's `layers`),
    "outside": bytes kept outside them (token ids, final norm, loss), "block_inputs": bytes of the
    layers' inputs (hidden states, RoPE tables; what activation checkpointing keeps), "total"}.
    Bytes of a layer's own inputs are left out of "blocks", so that with checkpointing the
    retained bytes are outside + block_inputs and a recomputed layer adds at most max(blocks).
    """
    from rankscope.models import token_losses

    weights = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, tuple[int, int | None]] = {}  # storage -> (bytes, the layer it was first kept in)
    inputs: dict[int, int] = {}
    # Every tensor looked at stays referenced until the count is done: a freed storage's identity
    # could be reused by a later tensor (a layer's input, once the next layer has consumed it).
    held: list[torch.Tensor] = []
    current: list[int | None] = [None]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in weights and key not in saved:
            saved[key] = (t.untyped_storage().nbytes(), current[0])
            held.append(t)
        return t

    def enter(index: int):
        def hook(module, args):
            current[0] = index
            for arg in args:
                if torch.is_tensor(arg):
                    inputs[_storage_key(arg)] = arg.untyped_storage().nbytes()
                    held.append(arg)
        return hook

    def leave(module, args, output):
        current[0] = None

    layers = list(getattr(model, "layers", []))
    handles = [layer.register_forward_pre_hook(enter(i)) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(leave) for layer in layers]
    try:
        with flash_attention_kernel(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            token_losses(model, input_ids).mean()
    finally:
        for handle in handles:
            handle.remove()
    blocks = [0] * len(layers)
    outside = 0
    for key, (nbytes, layer) in saved.items():
        if layer is None:
            outside += nbytes
        elif key not in inputs:
            blocks[layer] += nbytes
    block_inputs = sum(nbytes for key, nbytes in inputs.items() if key not in weights)
    return {"blocks": blocks, "outside": outside, "block_inputs": block_inputs,
            "total": sum(nbytes for nbytes, _ in saved.values())}


def dense_activation_bytes(config, batch_size: int, seq_len: int) -> dict:
    """`saved_activation_bytes` of the dense LLaMA (rankscope.models.llama) under bf16-pure, written
    out from its code. Per token, with h = hidden size, f = MLP width, n = heads, d = h / n,
    V = vocabulary, bf16 = 2 bytes and fp32 = 4:

    - each decoder block: 24h + 8f + 4n + 8
        two RMSNorms, each: its fp32 upcast (4h), the bf16 normalised x before the gain (2h), its
        output (2h, read by the projections after it) and the fp32 1/rms (4)      2 x (8h + 4)
        attention: q and k after RoPE and v (2h each), the output (2h; o_proj reads a view of
        it), the fp32 log-sum-exp per head (4n); RoPE's products keep only cos / sin   8h + 4n
        SwiGLU: gate(x) (read by silu), silu(gate(x)), up(x), their product (read by down) 8f
    - outside the blocks: the token id (8) and the final RMSNorm (8h + 4) per token; for each
      predicted token (T - 1 per sequence) the fp32 log-softmax (4V) and its target id (8; for a
      single sequence the targets are a view of the token ids, no copy); 4 bytes for the loss; and
      per sequence length the bf16 cos and sin tables (2 x 2·T·d).

    Activation checkpointing (`train.activation_checkpointing`: a non-reentrant checkpoint per
    block) keeps each block's input (2h per token) and the RoPE tables instead of the blocks'
    bytes; the backward of a block recomputes its 24h + 8f + 4n + 8 per token for its duration.
    The backward's own temporaries (activation gradients, a few h and f per token, one block at a
    time) are not in either count.
    """
    h, f, n, vocab = config.hidden_size, config.intermediate_size, config.num_heads, config.vocab_size
    tokens = batch_size * seq_len
    predicted = batch_size * (seq_len - 1)
    rope = 2 * 2 * seq_len * config.head_dim
    block = tokens * (24 * h + 8 * f + 4 * n + 8)
    targets = predicted * 8 if batch_size > 1 else 0
    outside = tokens * (8 + 8 * h + 4) + predicted * 4 * vocab + targets + 4
    block_inputs = config.num_layers * tokens * 2 * h + rope
    return {
        "block": block,
        "outside": outside,
        "total": outside + rope + config.num_layers * block,
        "checkpointed": outside + block_inputs,  # kept through the forward
        "checkpointed_peak": outside + block_inputs + block,  # plus one recomputed block
    }
