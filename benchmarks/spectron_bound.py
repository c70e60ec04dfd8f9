"""How close Spectron's update comes to its promise ||ΔW||₂ <= lr, on 60M-shaped factor pairs.

    python benchmarks/spectron_bound.py

For 512x512 and 1376x512 weights at rank 128 (balanced factors, σ_i(W) = s/√i for s = 1, 30, 100),
24 updates with lr 1e-2 in the worst-case direction (the gradient along W's top singular pair,
1e-3, plus 1e-4 noise), it prints max ||ΔW||₂ / lr over the first three updates (the power
iteration starts from a random vector) and over the rest (its vector has converged), and the
largest ||O||₂ Newton–Schulz produced, for NVIDIA's defaults and the two earlier rankscope
choices. Exact spectral norms in float64. It asserts nothing; docs/methods.md quotes the figures.
"""

from __future__ import annotations

import torch

from rankscope.optim import SpectronAdamW
from rankscope.optim.spectron import newton_schulz


def top_singular(left: torch.Tensor, right: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(σ₁, u₁, v₁) of left @ right without forming it: two QRs and a small SVD, float64."""
    q_left, r_left = torch.linalg.qr(left.double())
    q_right, r_right = torch.linalg.qr(right.double().T)
    u, sigma, vh = torch.linalg.svd(r_left @ r_right.T)
    return sigma[0].item(), q_left @ u[:, 0], q_right @ vh[0]


def factor_pair(d_out: int, d_in: int, rank: int, scale: float, generator: torch.Generator):
    """Balanced trainable factors B (d_out x r), A (r x d_in) with σ_i(B·A) = scale / √i."""
    U = torch.linalg.qr(torch.randn(d_out, rank, generator=generator, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d_in, rank, generator=generator, dtype=torch.float64))[0]
    root = (scale / torch.arange(1, rank + 1, dtype=torch.float64).sqrt()).sqrt()
    return torch.nn.Parameter((U * root).float()), torch.nn.Parameter((root[:, None] * V.T).float())


def worst_case_gradient(B: torch.Tensor, A: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """-1e-3 along the top singular pair of B·A, plus 1e-4 Gaussian noise: LLM-sized and aligned."""
    _, u, v = top_singular(B, A)
    return -1e-3 * torch.outer(u, v).float() + 1e-4 * torch.randn(B.shape[0], A.shape[1], generator=generator)


def measure(d_out: int, d_in: int, rank: int, scale: float, steps: int = 24, lr: float = 1e-2, **keys) -> tuple[float, float, float]:
    g = torch.Generator().manual_seed(d_out + int(scale))
    B, A = factor_pair(d_out, d_in, rank, scale, g)
    optimizer = SpectronAdamW([{"params": [B, A], "factor_pairs": True, **keys}], lr=lr, weight_decay=0.0)
    group = optimizer.param_groups[0]
    cold, warm, orthogonal = [], [], []
    for step in range(steps):
        B0, A0 = B.detach().clone(), A.detach().clone()
        G = worst_case_gradient(B0, A0, g)
        B.grad, A.grad = G @ A0.T, B0.T @ G
        optimizer.step()
        delta, _, _ = top_singular(torch.cat([B.detach(), -B0], 1), torch.cat([A.detach(), A0], 0))
        (cold if step < 3 else warm).append(delta / lr)
        if step in (0, steps - 1):
            for p in (B, A):
                orthogonalized = newton_schulz(optimizer.state[p]["momentum_buffer"], group["ns_steps"],
                                  group["ns_coefficients"], group["ns_precision"])
                orthogonal.append(torch.linalg.matrix_norm(orthogonalized.double(), ord=2).item())
    return max(cold), max(warm), max(orthogonal)


def main() -> None:
    torch.set_num_threads(1)
    variants = {"NVIDIA defaults": {}, "ns_coefficients=simple": {"ns_coefficients": "simple"},
                "power_side=short": {"power_side": "short"}}
    print(f"{'weight':>10} {'σ₁(W)':>6}  {'variant':24} {'first 3 max':>11} {'later max':>9} {'max|O|₂':>8}")
    for d_out, d_in in ((512, 512), (1376, 512)):
        for scale in (1.0, 30.0, 100.0):
            for name, keys in variants.items():
                cold, warm, o = measure(d_out, d_in, 128, scale, **keys)
                print(f"{d_out:>5}x{d_in:<4} {scale:>6.0f}  {name:24} {cold:>11.4f} {warm:>9.4f} {o:>8.4f}", flush=True)


if __name__ == "__main__":
    main()
