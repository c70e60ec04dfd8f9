"""One readable LLaMA: RMSNorm, RoPE, causal SDPA attention, SwiGLU MLP, pre-norm blocks.

The module tree and the numerics mirror Hugging Face `transformers`' Llama (same names, same
RoPE convention, RMSNorm in fp32) so that export to `LlamaForCausalLM` is a key-prefix map.
Attention and MLP call their projections as generic modules, so a low-rank method may replace
any `nn.Linear` by a module mapping `(..., d_in) -> (..., d_out)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rankscope.errors import ConfigError


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    max_seq_len: int = 2048
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for field_name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_layers", "max_seq_len"
        ):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{field_name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads != 0:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads "
                f"({self.num_heads}); choose a head count that divides it"
            )
        if self.head_dim % 2 != 0:
            raise ConfigError(
                f"head dimension hidden_size/num_heads = {self.head_dim} must be even for RoPE; "
                "change model.hidden_size or model.num_heads"
            )
        for field_name in ("rms_norm_eps", "init_std", "rope_theta"):
            if not getattr(self, field_name) > 0:
                raise ConfigError(f"model.{field_name} must be positive, got {getattr(self, field_name)!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the statistics in fp32 (as HF Llama) for bf16 stability."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast back before the gain, exactly as HF does, so exported logits agree bit-for-bit-ish.
        return self.weight * x32.to(input_dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim (HF's non-interleaved RoPE)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE up to `max_seq_len`, computed once, in fp32, where the module lives.

    The tables are never reassigned in forward: torch.compile guards on a module's buffers, and a
    table grown on the first call (or rebuilt after `model.to(bf16)` downcast it) made every
    compiled model compile twice. A longer sequence than `max_seq_len` gets tables computed for
    that call only.
    """

    def __init__(self, head_dim: int, theta: float, max_seq_len: int = 2048) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.max_seq_len = max_seq_len
        # Non-persistent: derived from the config, never saved (checkpoints never held them).
        cos, sin = self._compute(max_seq_len, None)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def _compute(self, seq_len: int, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (seq_len, head_dim) in fp32; row m depends on m only, so a prefix of
        a longer table equals the shorter table bit for bit."""
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim)
        )
        positions = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim), halves repeated
        return angles.cos(), angles.sin()

    def _apply(self, fn, recurse=True):
        # model.to(bf16) would round the tables, and to_empty() (materialising a model built on
        # the meta device) leaves them unset: recompute them in fp32 wherever they went. They
        # are computed on their device, as before, so CUDA runs keep CUDA's cos/sin values.
        super()._apply(fn, recurse)
        self.cos_cached, self.sin_cached = self._compute(self.max_seq_len, self.cos_cached.device)
        return self

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len <= self.cos_cached.shape[0]:
            cos, sin = self.cos_cached[:seq_len], self.sin_cached[:seq_len]
        else:
            cos, sin = self._compute(seq_len, self.cos_cached.device)
        return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, head_dim); cos/sin: (T, head_dim)."""
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        return x.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden = x.shape
        q = apply_rotary(self._split_heads(self.q_proj(x)), cos, sin)
        k = apply_rotary(self._split_heads(self.k_proj(x)), cos, sin)
        v = self._split_heads(self.v_proj(x))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(attended.transpose(1, 2).reshape(batch, seq_len, hidden))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_seq_len)
        self.layers = nn.ModuleList(LlamaBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # When set (the trainer does, from train.activation_checkpointing), each block keeps only
        # its input for the backward pass and recomputes the rest there. A training choice, not
        # the model's shape, so it is not in LlamaConfig and checkpoints do not record it.
        self.activation_checkpointing = False
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def forward(
        self, input_ids: torch.Tensor, output_hidden_states: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """input_ids (B, T) -> logits (B, T, V); with hidden states also the list of
        num_layers + 1 tensors (B, T, H): embedding output, then each block's output."""
        seq_len = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(seq_len, x.device, x.dtype)
        hidden: list[torch.Tensor] = [x]
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.layers:
            if recompute:
                # Non-reentrant: it works under torch.compile and DDP, and it replays the RNG, so a
                # recomputed dropout (LoRA's adapters) draws the same mask as the forward did.
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
            if output_hidden_states:
                hidden.append(x)
        logits = self.lm_head(self.norm(x))
        if output_hidden_states:
            return logits, hidden
        return logits

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def build_model(config: LlamaConfig) -> LlamaModel:
    return LlamaModel(config)


def count_parameters(config: LlamaConfig) -> int:
    """Closed-form parameter count of the plain model (for presets too big to build)."""
    hidden, ffn = config.hidden_size, config.intermediate_size
    per_block = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden  # attn + SwiGLU + two norms
    return 2 * config.vocab_size * hidden + config.num_layers * per_block + hidden
