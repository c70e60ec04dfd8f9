"""The benchmark's weights and gradients: the preset's targeted projections with gradients of a
1/i spectrum at LLM scale (RMS 1e-3), and the norms' weights that plain AdamW steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankscope.bench.optimizer.config import GRAD_RMS


@dataclass
class BenchTensors:
    shapes: list[tuple[int, int]]        # projected weights, model order
    weights: list[torch.Tensor]
    grads: list[torch.Tensor]
    plain_weights: list[torch.Tensor]    # RMSNorm weights: stepped by plain AdamW
    plain_grads: list[torch.Tensor]


def target_shapes(model_config) -> list[tuple[int, int]]:
    """(d_out, d_in) of every targeted projection of the model, in model order."""
    hidden, ffn = model_config.hidden_size, model_config.intermediate_size
    per_block = [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn)]
    return per_block * model_config.num_layers


def decaying_spectrum(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """U diag(1/i) Vᵀ with random orthonormal U, V, scaled to RMS `GRAD_RMS`."""
    k = min(rows, cols)
    u = torch.linalg.qr(torch.randn(rows, k, generator=generator))[0]
    v = torch.linalg.qr(torch.randn(cols, k, generator=generator))[0]
    matrix = (u / torch.arange(1, k + 1, dtype=torch.float32)) @ v.T
    return matrix * (GRAD_RMS / matrix.square().mean().sqrt())


def bench_tensors(model_config, seed: int, device: torch.device) -> BenchTensors:
    """Weights at the init scale and gradients with a 1/i spectrum.

    One base gradient per shape (QR is the slow part); each matrix gets it with its rows permuted
    and its columns' signs flipped at random, which keeps the spectrum and changes the singular
    vectors.
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = target_shapes(model_config)
    bases = {shape: decaying_spectrum(*shape, generator) for shape in dict.fromkeys(shapes)}
    weights, grads = [], []
    for rows, cols in shapes:
        weights.append((0.02 * torch.randn(rows, cols, generator=generator)).to(device))
        rows_order = torch.randperm(rows, generator=generator)
        signs = torch.randint(0, 2, (cols,), generator=generator).float() * 2 - 1
        grads.append((bases[(rows, cols)][rows_order] * signs).to(device))
    hidden = model_config.hidden_size
    n_norms = 2 * model_config.num_layers
    plain_weights = [torch.ones(hidden, device=device) for _ in range(n_norms)]
    plain_grads = [(GRAD_RMS * torch.randn(hidden, generator=generator)).to(device) for _ in range(n_norms)]
    return BenchTensors(shapes, weights, grads, plain_weights, plain_grads)
