"""LlamaModel against direct reference computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankscope.errors import ConfigError
from rankscope.models import (
    TARGET_LINEARS,
    LlamaConfig,
    build_model,
    iter_target_linears,
    token_losses,
)
from rankscope.models.llama import RMSNorm, RotaryEmbedding, apply_rotary


def small_config(**changes) -> LlamaConfig:
    settings = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_heads=4, num_layers=2, max_seq_len=64)
    settings.update(changes)
    return LlamaConfig(**settings)


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    # A larger init than training uses so attention is far from uniform and mistakes show.
    return build_model(small_config(init_std=0.3)).eval()


def test_logits_shape_and_dtype(model):
    ids = torch.randint(0, 97, (3, 11))
    logits = model(ids)
    assert logits.shape == (3, 11, 97)
    assert logits.dtype == torch.float32


def test_changing_a_later_token_leaves_earlier_logits_unchanged(model):
    ids = torch.randint(0, 97, (2, 16))
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 97
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=1e-6)
    assert (before[:, 10:] - after[:, 10:]).abs().max() > 1e-3  # the change does propagate forward


def test_hidden_states_are_embedding_then_each_block(model):
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        logits, hidden = model(ids, output_hidden_states=True)
        assert len(hidden) == model.config.num_layers + 1
        assert all(h.shape == (2, 9, 32) for h in hidden)
        torch.testing.assert_close(hidden[0], model.embed_tokens(ids))
        torch.testing.assert_close(model.lm_head(model.norm(hidden[-1])), logits)
        torch.testing.assert_close(logits, model(ids))


def test_rmsnorm_matches_formula_and_computes_in_fp32():
    torch.manual_seed(1)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(4, 16) * 3
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    # bf16 input: statistics in fp32, result cast back before the gain (HF convention).
    x16 = x.to(torch.bfloat16)
    x32 = x16.float()
    expected16 = (x32 / torch.sqrt((x32**2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    norm16 = norm.to(torch.bfloat16)
    assert norm16(x16).dtype == torch.bfloat16
    torch.testing.assert_close(norm16(x16), norm16.weight * expected16)


def reference_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pair (i, i + d/2) at position m by angle m * theta^(-2i/d), written out per pair."""
    seq_len, dim = x.shape[-2], x.shape[-1]
    half = dim // 2
    out = torch.empty_like(x)
    for m in range(seq_len):
        for i in range(half):
            angle = m * theta ** (-2 * i / dim)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[..., m, i], x[..., m, i + half]
            out[..., m, i] = a * c - b * s
            out[..., m, i + half] = a * s + b * c
    return out


def test_rope_matches_pairwise_rotation_reference():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    rotary = RotaryEmbedding(head_dim=8, theta=500.0)
    cos, sin = rotary(7, x.device, torch.float64)
    torch.testing.assert_close(apply_rotary(x, cos, sin), reference_rope(x, 500.0), rtol=1e-5, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(3)
    rotary = RotaryEmbedding(head_dim=16, theta=10000.0)
    cos, sin = rotary(40, torch.device("cpu"), torch.float32)
    q, k = torch.randn(16), torch.randn(16)
    rq = apply_rotary(q.expand(40, 16), cos, sin)
    rk = apply_rotary(k.expand(40, 16), cos, sin)
    torch.testing.assert_close(rq[5] @ rk[2], rq[30] @ rk[27], rtol=1e-4, atol=1e-5)


def test_rope_tables_are_fixed_fp32_and_not_saved(model):
    """The tables are computed once for max_seq_len, stay fp32 through model.to(bf16) and a
    meta-device build materialised with to_empty, and are never part of a checkpoint."""
    assert not any("rotary" in key or "cached" in key for key in model.state_dict())
    reference = RotaryEmbedding(model.config.head_dim, model.config.rope_theta, model.config.max_seq_len)
    assert model.rotary.cos_cached.shape == (model.config.max_seq_len, model.config.head_dim)
    tables = model.rotary.cos_cached
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 4)))
        model(torch.randint(0, 97, (1, 20)))
    assert model.rotary.cos_cached is tables  # a forward never rebuilds them
    model.to(torch.bfloat16)
    assert model.rotary.cos_cached.dtype == torch.float32
    assert torch.equal(model.rotary.cos_cached, reference.cos_cached)
    assert torch.equal(model.rotary.sin_cached, reference.sin_cached)
    with torch.device("meta"):
        skeleton = build_model(model.config)
    skeleton.to_empty(device="cpu")
    assert torch.equal(skeleton.rotary.cos_cached, reference.cos_cached)
    assert torch.equal(skeleton.rotary.sin_cached, reference.sin_cached)


def test_rope_beyond_max_seq_len_matches_the_reference():
    torch.manual_seed(6)
    rotary = RotaryEmbedding(head_dim=8, theta=500.0, max_seq_len=4)
    x = torch.randn(1, 2, 7, 8, dtype=torch.float64)
    cos, sin = rotary(7, x.device, torch.float64)
    torch.testing.assert_close(apply_rotary(x, cos, sin), reference_rope(x, 500.0), rtol=1e-5, atol=1e-6)
    assert rotary.cos_cached.shape[0] == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_compiled_model_compiles_once(dtype):
    """torch.compile traces the model once: a RoPE table rebuilt inside forward (grown on the first
    call, or back to fp32 after model.to(bf16)) failed Dynamo's guard and compiled it twice."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(7)
    model = build_model(small_config()).to(dtype)
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(3):
        token_losses(compiled, torch.randint(0, 97, (2, 16))).mean().backward()
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def reference_block(block, x, theta):
    """One pre-norm block with attention written out: explicit scores, mask, softmax."""
    batch, seq_len, hidden = x.shape
    heads = block.self_attn.num_heads
    head_dim = hidden // heads

    def rms(t, norm):
        return t / torch.sqrt((t**2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    def heads_of(t):
        return t.view(batch, seq_len, heads, head_dim).transpose(1, 2)

    attn = block.self_attn
    h = rms(x, block.input_layernorm)
    q = reference_rope(heads_of(h @ attn.q_proj.weight.T), theta)
    k = reference_rope(heads_of(h @ attn.k_proj.weight.T), theta)
    v = heads_of(h @ attn.v_proj.weight.T)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    future = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    x = x + (probs @ v).transpose(1, 2).reshape(batch, seq_len, hidden) @ attn.o_proj.weight.T
    mlp = block.mlp
    h = rms(x, block.post_attention_layernorm)
    return x + (F.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


def test_block_matches_explicit_attention_reference(model):
    torch.manual_seed(4)
    x = torch.randn(2, 6, 32)
    block = model.layers[0]
    cos, sin = model.rotary(6, x.device, x.dtype)
    with torch.no_grad():
        torch.testing.assert_close(block(x, cos, sin), reference_block(block, x, 10000.0), rtol=1e-4, atol=1e-5)


def test_init_and_no_biases():
    torch.manual_seed(5)
    cfg = small_config(hidden_size=64, intermediate_size=128, vocab_size=500, init_std=0.05)
    model = build_model(cfg)
    pooled = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            assert getattr(module, "bias", None) is None, name
            # N(0, 0.05²): the sample std of n entries has sd 0.05/sqrt(2n), the mean 0.05/sqrt(n);
            # 5 of those (the smallest matrix, 64x64: std within ±5.5%).
            n = module.weight.numel()
            assert abs(module.weight.std().item() - 0.05) < 5 * 0.05 / (2 * n) ** 0.5, name
            assert abs(module.weight.mean().item()) < 5 * 0.05 / n**0.5, name
            pooled.append(module.weight.detach().flatten())
    # Over every weight (146k entries; sampling sd 0.2%) the std is 0.05 within 1%: init_std 1.5% off fails.
    assert torch.cat(pooled).std().item() == pytest.approx(0.05, rel=0.01)
    for name, module in model.named_modules():
        if isinstance(module, RMSNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()  # untied
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


def test_iter_target_linears_finds_every_projection_including_replaced_ones(model):
    found = list(iter_target_linears(model))
    assert len(found) == len(TARGET_LINEARS) * model.config.num_layers
    modules = dict(model.named_modules())
    for name, parent, attr, module in found:
        assert modules[name] is module and getattr(parent, attr) is module
        assert name.rsplit(".", 1)[1] == attr

    # Swap one projection for an arbitrary module: the forward uses it and the iterator finds it.
    _, parent, attr, _ = found[1]
    replacement = nn.Sequential(nn.Linear(32, 4, bias=False), nn.Linear(4, 32, bias=False))
    setattr(parent, attr, replacement)
    assert list(iter_target_linears(model))[1][3] is replacement
    ids = torch.randint(0, 97, (2, 5))
    model(ids).sum().backward()
    assert replacement[0].weight.grad is not None and replacement[0].weight.grad.abs().sum() > 0


def test_token_losses_are_fp32_next_token_cross_entropy(model):
    ids = torch.randint(0, 97, (3, 10))
    with torch.no_grad():
        losses = token_losses(model, ids)
        log_probs = model(ids).double().log_softmax(-1)
    assert losses.shape == (3, 9) and losses.dtype == torch.float32
    expected = -log_probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-5)


def test_token_losses_upcast_bf16_logits(model):
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        reference = token_losses(model, ids)  # fp32 weights and logits
        losses = token_losses(model.to(torch.bfloat16), ids)
    assert losses.dtype == torch.float32 and losses.shape == (2, 6)
    # The bf16 model's losses are the fp32 ones up to bf16 rounding (~3 significant digits per
    # weight and activation), not a different or overflowing computation.
    torch.testing.assert_close(losses, reference, rtol=2e-2, atol=2e-2)


def test_config_rejects_bad_shapes():
    with pytest.raises(ConfigError, match="divisible"):
        small_config(num_heads=5)
    with pytest.raises(ConfigError, match="even"):
        small_config(hidden_size=12, num_heads=4)
    with pytest.raises(ConfigError, match="num_layers"):
        small_config(num_layers=0)
