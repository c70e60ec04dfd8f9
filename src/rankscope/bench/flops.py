"""Model FLOPs counted from the real modules, and model FLOPs utilisation (MFU).

Convention (as PaLM's MFU and nanoGPT's `estimate_mfu`): only matrix products count, one
multiply-add = 2 FLOPs; elementwise work (norms, activations, RoPE, softmax) is ignored, and so
is the embedding lookup. For a dense linear `d_in -> d_out` on n tokens that gives the familiar
6·N per token for training: forward 2·d_in·d_out, backward 2·d_in·d_out for the input gradient
plus 2·d_in·d_out for the weight gradient (skipped when the weight is frozen, as LoRA's W0).
Attention adds, per layer and token, 4·T·d forward (QKᵀ and AV over all T keys, not halved for
the causal mask, as PaLM counts) and twice that backward.

Each parameterized layer is counted from what its forward / backward actually computes:
- LowRankLinear / ColaLinear: through the bottleneck, 2·r·(d_in + d_out) per token forward.
- LoRALinear: the frozen dense product plus the adapter bottleneck.
- SparsePlusLowRankLinear: forms W = s·B·A + S once per call (2·r·d_in·d_out), then a dense
  product; its backward takes whichever weight-gradient path the layer itself takes.
Any other layer is measured with `torch.utils.flop_counter.FlopCounterMode` on a probe input,
so a new layer class is counted correctly without touching this file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from rankscope.errors import ConfigError


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs of one linear-like layer for one call on `tokens` tokens."""

    name: str
    kind: str
    tokens: int
    forward: int
    backward: int

    @property
    def training(self) -> int:
        return self.forward + self.backward


@dataclass
class ModelFlops:
    """FLOPs of one forward+backward of the whole model on a (batch, seq_len) batch of tokens."""

    batch_size: int
    seq_len: int
    layers: list[LayerFlops] = field(default_factory=list)
    attention_forward: int = 0
    attention_backward: int = 0

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def forward(self) -> int:
        return sum(layer.forward for layer in self.layers) + self.attention_forward

    @property
    def backward(self) -> int:
        return sum(layer.backward for layer in self.layers) + self.attention_backward

    @property
    def training(self) -> int:
        return self.forward + self.backward

    @property
    def forward_per_token(self) -> float:
        return self.forward / self.tokens

    @property
    def training_per_token(self) -> float:
        return self.training / self.tokens


def _trainable(tensor: torch.Tensor) -> bool:
    return bool(tensor.requires_grad)


def linear_flops(module: nn.Module, tokens: int, name: str = "") -> LayerFlops:
    """FLOPs of `module` (a linear or a parameterized linear) applied to `tokens` tokens."""
    from rankscope.nn import ColaLinear, LoRALinear, LowRankLinear, SparsePlusLowRankLinear

    kind = type(module).__name__
    n = tokens
    if isinstance(module, nn.Linear):
        d_in, d_out = module.in_features, module.out_features
        forward = 2 * n * d_in * d_out
        backward = 2 * n * d_in * d_out + (2 * n * d_in * d_out if _trainable(module.weight) else 0)
        return LayerFlops(name, kind, n, forward, backward)
    if isinstance(module, (LowRankLinear, ColaLinear)):
        d_in, d_out, r = module.in_features, module.out_features, module.rank
        # forward: z = x·Aᵀ (2·n·r·d_in), y = z·Bᵀ (2·n·d_out·r)
        # backward: h = g·B and dx = h·A (input), g_B = gᵀ·z and g_A = hᵀ·x (weights)
        forward = 2 * n * r * (d_in + d_out)
        grad_input = 2 * n * r * (d_in + d_out)
        grad_weights = (2 * n * d_out * r if _trainable(module.B) else 0) + (2 * n * r * d_in if _trainable(module.A) else 0)
        return LayerFlops(name, kind, n, forward, grad_input + grad_weights)
    if isinstance(module, LoRALinear):
        d_in, d_out, r = module.in_features, module.out_features, module.rank
        dense = 2 * n * d_in * d_out
        adapter = 2 * n * r * (d_in + d_out)
        grad_dense_weight = dense if _trainable(module.weight) else 0
        grad_adapter = (2 * n * d_out * r if _trainable(module.B) else 0) + (2 * n * r * d_in if _trainable(module.A) else 0)
        return LayerFlops(name, kind, n, dense + adapter, dense + grad_dense_weight + adapter + grad_adapter)
    if isinstance(module, SparsePlusLowRankLinear):
        d_in, d_out, r = module.in_features, module.out_features, module.rank
        form_weight = 2 * r * d_in * d_out
        product = 2 * n * d_in * d_out
        forward = form_weight + product
        backward = form_weight + product  # rebuild W, dx = g·W
        backward += product  # dense weight gradient gᵀ·x (the values are gathered from it)
        if n * (d_in + d_out) >= d_in * d_out:  # the layer reuses G_W for grad_A and grad_B
            backward += 2 * form_weight
        else:  # through the bottleneck: (g·B)ᵀ·x and gᵀ·(x·Aᵀ)
            backward += 4 * n * r * (d_in + d_out)
        return LayerFlops(name, kind, n, forward, backward)
    return measured_layer_flops(module, tokens, name)


def measured_layer_flops(module: nn.Module, tokens: int, name: str = "") -> LayerFlops:
    """Count an unknown layer by running it once under FlopCounterMode (matmuls only)."""
    from torch.utils.flop_counter import FlopCounterMode

    d_in = getattr(module, "in_features", None)
    if d_in is None:
        raise ConfigError(f"cannot count FLOPs of layer {name or type(module).__name__}: it has no in_features")
    parameter = next(module.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    x = torch.randn(tokens, d_in, dtype=dtype, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        y = module(x)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        y.backward(torch.ones_like(y))
    backward = counter.get_total_flops()
    for p in module.parameters():  # the probe must not leave gradients behind
        p.grad = None
    return LayerFlops(name, type(module).__name__, tokens, int(forward), int(backward))


def model_flops(model: nn.Module, batch_size: int, seq_len: int) -> ModelFlops:
    """FLOPs of one training step's forward+backward of a (parameterized) LLaMA on B x T tokens."""
    from rankscope.models.dense import unwrap_model
    from rankscope.models.llama import LlamaAttention
    from rankscope.nn import ParameterizedLinear

    model = unwrap_model(model)
    result = ModelFlops(batch_size=batch_size, seq_len=seq_len)
    tokens = batch_size * seq_len
    counted: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in counted):
            continue  # inside a layer already counted as a whole
        if isinstance(module, (nn.Linear, ParameterizedLinear)):
            result.layers.append(linear_flops(module, tokens, name))
            counted.append(name)
        elif isinstance(module, LlamaAttention):
            hidden = module.num_heads * module.head_dim
            scores_and_values = 4 * batch_size * seq_len * seq_len * hidden
            result.attention_forward += scores_and_values
            result.attention_backward += 2 * scores_and_values
    return result


# ---------------------------------------------------------------------------------------------
# MFU

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets (which print
# the 2:4-sparsity figure first: dense is half of it). A device name matches a pattern when the
# pattern's words appear in it as whole, consecutive words (see `model_tokens`), so "L4" is not an
# "L40" and "A10" not an "A10G"; the first match wins, so a variant ("H100 NVL") precedes its family.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.5),      # GH200 data sheet: FP16/BF16 Tensor Core 1,979 TFLOPS with sparsity
    ("H200 NVL", 835.5),   # H200 data sheet, H200 NVL: BF16 Tensor Core 1,671 TFLOPS with sparsity
    ("H200", 989.5),       # H200 data sheet, H200 SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity
    ("H100 NVL", 835.5),   # H100 data sheet, H100 NVL: BF16 Tensor Core 1,671 TFLOPS with sparsity
    ("H100 PCIe", 756.5),  # H100 data sheet, H100 PCIe: BF16 Tensor Core 1,513 TFLOPS with sparsity
    ("H100", 989.5),       # H100 data sheet, H100 SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity
    ("H800", 989.5),       # the H100 SXM's compute
    ("B200", 2250.0),      # HGX B200: FP16/BF16 4.5 PFLOPS per GPU with sparsity
    ("A100", 312.0),       # A100 data sheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity), SXM and PCIe
    ("A800", 312.0),       # the A100's compute
    ("L40S", 362.05),      # L40S data sheet: BF16 Tensor Core 362.05 | 733 TFLOPS with sparsity
    ("L40", 181.05),       # L40 data sheet: BF16 Tensor Core 181.05 | 362.1 TFLOPS with sparsity
    ("L4", 121.0),         # L4 data sheet: BF16 Tensor Core 242 TFLOPS with sparsity
    ("A10G", 70.0),        # AWS-only part, no NVIDIA data sheet: ~70 dense, as third-party spec tables give it
    ("A10", 125.0),        # A10 data sheet: BF16 Tensor Core 125 TF | 250 TF with sparsity
    ("RTX 4090", 165.2),   # Ada whitepaper, GeForce RTX 4090: BF16 Tensor with FP32 accumulate 165.2 | 330.4
)


def model_tokens(name: str) -> list[str]:
    """The words of a device or pattern name, lowercased: runs of letters and digits
    ("NVIDIA A100-SXM4-80GB" -> nvidia, a100, sxm4, 80gb)."""
    return re.findall(r"[a-z0-9]+", name.lower())


def lookup_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a known GPU by its name (torch.cuda.get_device_name), or None."""
    words = model_tokens(device_name)
    for pattern, tflops in PEAK_BF16_TFLOPS:
        wanted = model_tokens(pattern)
        if any(words[start:start + len(wanted)] == wanted for start in range(len(words))):
            return tflops
    return None


def mfu(flops_per_token: float, tokens_per_second: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak FLOP/s."""
    if peak_tflops <= 0:
        raise ConfigError(f"--peak-tflops must be positive, got {peak_tflops}")
    return flops_per_token * tokens_per_second / (peak_tflops * 1e12)
