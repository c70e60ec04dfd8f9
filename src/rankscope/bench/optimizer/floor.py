"""The floor of a projected step: the arithmetic it cannot avoid (Adam on the low-rank tensors, the
projection and back-projection matmuls, Fira's and APOLLO's full-size residual passes), each
timed alone on the same shapes (see the package docstring)."""

from __future__ import annotations

import torch

from rankscope.bench.optimizer.config import EPS, GRAD_RMS, LR
from rankscope.bench.optimizer.tensors import BenchTensors


class Floor:
    """The unavoidable parts of a projected step, each callable on its own (see the module doc)."""

    def __init__(self, tensors: BenchTensors, rank: int, device: torch.device):
        from rankscope.optim.projector import projection_side

        generator = torch.Generator().manual_seed(1)
        self.sides = [projection_side(shape, "std") for shape in tensors.shapes]
        self.weights = [w.clone() for w in tensors.weights]
        self.grads = tensors.grads
        self.projectors, self.lows = [], []
        for (rows, cols), side in zip(tensors.shapes, self.sides):
            if side == "right":
                basis = torch.linalg.qr(torch.randn(cols, rank, generator=generator))[0].T.contiguous()
                self.lows.append(torch.empty(rows, rank, device=device))
            else:
                basis = torch.linalg.qr(torch.randn(rows, rank, generator=generator))[0]
                self.lows.append(torch.empty(rank, cols, device=device))
            self.projectors.append(basis.to(device))
        adam_params = [torch.nn.Parameter(torch.zeros_like(low)) for low in self.lows]
        adam_params += [torch.nn.Parameter(w.clone()) for w in tensors.plain_weights]
        for p, g in zip(adam_params, [GRAD_RMS * torch.randn_like(low) for low in self.lows] + tensors.plain_grads):
            p.grad = g
        self.adam = torch.optim.AdamW(adam_params, lr=LR, eps=EPS, foreach=True)
        self.stacks = self._stacks() if device.type == "cuda" else []
        # Fira's residual S = G·phi (phi per row for a right projection, per column for a left one).
        self.residuals = [torch.empty_like(w) for w in self.weights]
        self.phis = [torch.rand(w.shape[0], 1, generator=generator).to(device) if side == "right"
                     else torch.rand(1, w.shape[1], generator=generator).to(device)
                     for w, side in zip(self.weights, self.sides)]

    def _stacks(self) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(side, G, P, W, low) stacked per distinct shape and side, for the batched form."""
        by_key: dict[tuple, list[int]] = {}
        for index, (weight, side) in enumerate(zip(self.weights, self.sides)):
            by_key.setdefault((tuple(weight.shape), side), []).append(index)
        return [(side, torch.stack([self.grads[i] for i in ids]), torch.stack([self.projectors[i] for i in ids]),
                 torch.stack([self.weights[i] for i in ids]), torch.stack([self.lows[i] for i in ids]))
                for (_, side), ids in by_key.items()]

    def adam_step(self) -> None:
        self.adam.step()

    def matmuls(self, back_projections: int) -> None:
        for grad, weight, projector, low, side in zip(self.grads, self.weights, self.projectors, self.lows, self.sides):
            project_and_back(grad, weight, projector, low, side, back_projections)

    def residual_passes(self) -> None:
        """Fira's full-size elementwise work alone: form S = G·phi, take ||S||, add S to W."""
        for grad, weight, residual, phi in zip(self.grads, self.weights, self.residuals, self.phis):
            torch.mul(grad, phi, out=residual)
            torch.linalg.vector_norm(residual)
            weight.add_(residual, alpha=-LR)

    def batched_matmuls(self, back_projections: int) -> None:
        for side, grads, projectors, weights, lows in self.stacks:
            project_and_back(grads, weights, projectors, lows, side, back_projections)


def project_and_back(grad: torch.Tensor, weight: torch.Tensor, projector: torch.Tensor, low: torch.Tensor,
                     side: str, back_projections: int) -> None:
    """low = projection of grad; weight += back(low), `back_projections` times (matrices or stacks)."""
    matmul = torch.mm if grad.dim() == 2 else torch.bmm
    accumulate = weight.addmm_ if grad.dim() == 2 else weight.baddbmm_
    if side == "right":
        matmul(grad, projector.mT, out=low)
        for _ in range(back_projections):
            accumulate(low, projector, alpha=-LR)
    else:
        matmul(projector.mT, grad, out=low)
        for _ in range(back_projections):
            accumulate(projector, low, alpha=-LR)


# APOLLO projects but never projects back: its update is the raw gradient, scaled.
BACK_PROJECTIONS = {"galore": 1, "fira": 2, "apollo": 0}
# Families with full-size elementwise passes no implementation avoids (scaling G, its norm, the add).
RESIDUAL_FAMILIES = ("fira", "apollo")

