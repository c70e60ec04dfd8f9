"""The probe set: a fixed set of held-out sequences, identical for every run of a study, and the
mean next-token loss on it (METRICS.md, notation).

The sequences are tokenized once, cut into batches and moved to the device once, so one
evaluation of L(θ) costs one forward pass over the probe set and a single device sync.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from rankscope.errors import AnalysisError
from rankscope.models import token_losses

LOSS_AVERAGES = ("batch_mean", "token")


class Probe:
    """The tokenized probe set, cut into batches and moved to the device once.

    :meth:`loss` averages the next-token losses in one of two ways (``loss_average``):

    - ``batch_mean`` (the study's ``compute_nll_loss`` in low-rank-geometry,
      loss-landscape/LLMLandscape/exps/landscape/most/landscape_eval_utils.py): the mean over
      batches of each batch's mean token loss; a smaller last batch weighs as much as a full one;
    - ``token`` (ours): the exact token-weighted mean, with the same arithmetic as
      :func:`rankscope.train.setup.evaluate_loss` (fp64 sum of per-batch fp64 sums, in batch
      order), so both give the same number bit for bit.

    With one batch, or equal batches of packed sequences, the two agree. It syncs once per call.
    """

    def __init__(
        self,
        sequences: torch.Tensor,
        batch_size: int = 32,
        device: torch.device | str = "cpu",
        mask_padding: bool = True,
        loss_average: str = "batch_mean",
    ) -> None:
        if sequences.ndim != 2 or sequences.shape[0] == 0 or sequences.shape[1] < 2:
            raise AnalysisError(f"the probe set must be (n_sequences >= 1, seq_len >= 2) token ids, got {tuple(sequences.shape)}")
        if loss_average not in LOSS_AVERAGES:
            raise AnalysisError(f"unknown loss_average {loss_average!r}; use {' or '.join(LOSS_AVERAGES)}")
        self.sequences = sequences.detach().to("cpu", torch.long)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.mask_padding = mask_padding
        self.loss_average = loss_average
        self.batches = [
            self.sequences[start : start + self.batch_size].to(self.device)
            for start in range(0, self.sequences.shape[0], self.batch_size)
        ]
        self.tokens = self.sequences.shape[0] * (self.sequences.shape[1] - 1)
        self.fingerprint = probe_fingerprint(self.sequences)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    @torch.no_grad()
    def loss(self, model: nn.Module) -> float:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for batch in self.batches:
            losses = token_losses(model, batch)
            if self.loss_average == "batch_mean":
                total += losses.double().sum() / losses.numel()
                count += 1
            else:
                total += losses.double().sum()
                count += losses.numel()
        return float(total.cpu() / max(count, 1))

    def batch_weights(self) -> list[float]:
        """The weight of each batch's mean loss in :meth:`loss` (they sum to 1), for callers that
        differentiate the loss batch by batch (the Hessian)."""
        if self.loss_average == "batch_mean":
            return [1.0 / len(self.batches)] * len(self.batches)
        sizes = [batch.shape[0] * (batch.shape[1] - 1) for batch in self.batches]
        return [size / sum(sizes) for size in sizes]

    def padding_mask(self, batch: torch.Tensor) -> torch.Tensor | None:
        """Which positions are real tokens (None: no masking).

        Probe sequences are packed from a token stream (documents joined by EOS), so no position
        is padding and the mask is all true; with ``mask_padding=False`` no mask is applied at all,
        as in the study's code. Both give the same numbers here (see meta.json).
        """
        if not self.mask_padding:
            return None
        return torch.ones(batch.shape, dtype=torch.bool, device=batch.device)


def probe_fingerprint(sequences: torch.Tensor) -> str:
    """sha256 over the probe's shape and token ids."""
    data = sequences.detach().to("cpu", torch.int64).contiguous()
    digest = hashlib.sha256(f"{tuple(data.shape)}".encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def sync(device: torch.device) -> None:
    """Wait for the device (timings only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
