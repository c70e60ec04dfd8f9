"""Similarity of activations to a reference run (METRICS.md §4).

Inputs are activations ``X`` (the reference) and ``Y`` (the run compared), one row per position:
shape ``(N, H)``, or any leading shape ``(..., H)`` (e.g. ``(B, T, H)`` hidden states) which is
flattened to rows. ``mask`` is an optional boolean tensor over the rows (shape ``(N,)`` or the
leading shape, e.g. ``(B, T)``); ``False`` rows (padding) are dropped before anything else,
including the column centring of CKA.

Everything is computed in fp64. CKA uses the feature-space form, so its cost is ``N·H²`` and its
memory ``H²``: an ``N × N`` matrix is never formed.

:class:`SimilarityAccumulator` gathers sufficient statistics batch by batch and gives the same
numbers as the one-shot functions on the concatenated rows, so the probe set never has to be
held in memory at once.
"""

from __future__ import annotations

import torch

from rankscope.errors import AnalysisError


def _rows(
    X: torch.Tensor, Y: torch.Tensor, mask: torch.Tensor | None, *, same_width: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten to ``(N, H)`` rows and drop the masked ones (validating shapes on the way)."""
    for name, t in (("X", X), ("Y", Y)):
        if not isinstance(t, torch.Tensor):
            raise AnalysisError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim < 2:
            raise AnalysisError(f"{name} must have shape (N, H) or (..., H), got {tuple(t.shape)}")
    if X.shape[:-1] != Y.shape[:-1]:
        raise AnalysisError(
            f"X has rows {tuple(X.shape[:-1])} but Y has {tuple(Y.shape[:-1])}; "
            "compare activations of the same positions"
        )
    if same_width and X.shape[-1] != Y.shape[-1]:
        raise AnalysisError(
            f"X has width {X.shape[-1]} but Y has {Y.shape[-1]}; cosine and L2 need equal widths "
            "(only CKA compares different widths)"
        )
    X2 = X.detach().reshape(-1, X.shape[-1])
    Y2 = Y.detach().reshape(-1, Y.shape[-1])
    if mask is not None:
        if mask.dtype != torch.bool:
            raise AnalysisError(f"mask must be a boolean tensor, got dtype {mask.dtype}; use mask.bool()")
        if mask.numel() != X2.shape[0] or mask.shape not in (X.shape[:-1], torch.Size([X2.shape[0]])):
            raise AnalysisError(
                f"mask has shape {tuple(mask.shape)} but the activations have rows {tuple(X.shape[:-1])}; "
                "pass one boolean per position"
            )
        keep = mask.reshape(-1).to(X2.device)
        X2 = X2[keep]
        Y2 = Y2[keep.to(Y2.device)]
    return X2, Y2.to(X2.device)


def _rowwise(X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row cosine(X_n, Y_n), ‖X_n − Y_n‖₂ and ‖X_n‖₂ (inputs already fp64).

    A zero row has cosine 0 with anything (the denominator is clamped, as torch's
    cosine_similarity does), rather than nan.
    """
    x_norm = torch.linalg.vector_norm(X, dim=1)
    y_norm = torch.linalg.vector_norm(Y, dim=1)
    dot = (X * Y).sum(1)
    cos = dot / (x_norm * y_norm).clamp_min(torch.finfo(X.dtype).tiny)
    dist = torch.linalg.vector_norm(X - Y, dim=1)
    return cos, dist, x_norm


def _require_rows(n: int) -> None:
    if n == 0:
        raise AnalysisError("no rows left to compare (empty input or everything masked); check the mask")


def _cka_from_centered_grams(xx: torch.Tensor, yy: torch.Tensor, yx: torch.Tensor) -> float:
    """``‖YᵀX‖_F² / (‖XᵀX‖_F ‖YᵀY‖_F)`` from centred Gram matrices; nan if a side is constant."""
    numerator = (yx * yx).sum()
    denominator = torch.linalg.matrix_norm(xx) * torch.linalg.matrix_norm(yy)
    if denominator == 0:
        return float("nan")
    return (numerator / denominator).item()


# --- one-shot functions -----------------------------------------------------------------------


def linear_cka(X: torch.Tensor, Y: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Linear CKA (Kornblith et al. 2019) between X (N × H1) and Y (N × H2), in fp64.

    Columns are centred over the kept rows; widths may differ. ``nan`` if either side is constant.
    """
    X2, Y2 = _rows(X, Y, mask, same_width=False)
    _require_rows(X2.shape[0])
    Xc = X2.to(torch.float64)
    Yc = Y2.to(torch.float64)
    Xc = Xc - Xc.mean(0, keepdim=True)
    Yc = Yc - Yc.mean(0, keepdim=True)
    return _cka_from_centered_grams(Xc.T @ Xc, Yc.T @ Yc, Yc.T @ Xc)


def cosine(X: torch.Tensor, Y: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean over rows of the cosine similarity between X_n and Y_n."""
    X2, Y2 = _rows(X, Y, mask, same_width=True)
    _require_rows(X2.shape[0])
    cos, _, _ = _rowwise(X2.to(torch.float64), Y2.to(torch.float64))
    return cos.mean().item()


def l2(X: torch.Tensor, Y: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean over rows of ‖X_n − Y_n‖₂."""
    X2, Y2 = _rows(X, Y, mask, same_width=True)
    _require_rows(X2.shape[0])
    _, dist, _ = _rowwise(X2.to(torch.float64), Y2.to(torch.float64))
    return dist.mean().item()


def relative_l2(X: torch.Tensor, Y: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean row distance divided by the mean row norm of X (X is the reference)."""
    X2, Y2 = _rows(X, Y, mask, same_width=True)
    _require_rows(X2.shape[0])
    _, dist, x_norm = _rowwise(X2.to(torch.float64), Y2.to(torch.float64))
    return (dist.mean() / x_norm.mean()).item()


# --- streaming accumulators -------------------------------------------------------------------


class CKAAccumulator:
    """Linear CKA over rows fed in batches: ``update(X, Y, mask)`` repeatedly, then ``cka()``.

    Keeps ``n``, the column sums and the Gram matrices XᵀX, YᵀY, YᵀX (memory ``O(H²)``), in
    ``dtype`` (fp64 by default) on the device of the first batch. To keep the centring exact in
    floating point, rows are shifted by the mean of the first batch before they are summed
    (centring is shift invariant, and the shift removes the large common offset that would
    otherwise cancel in XᵀX − n·μμᵀ).
    """

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.count = 0
        self._shift_x: torch.Tensor | None = None
        self._shift_y: torch.Tensor | None = None
        self._sum_x: torch.Tensor | None = None
        self._sum_y: torch.Tensor | None = None
        self._xx: torch.Tensor | None = None
        self._yy: torch.Tensor | None = None
        self._yx: torch.Tensor | None = None

    _same_width = False  # CKA compares layers of different widths; subclasses may require equality

    def update(self, X: torch.Tensor, Y: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add a batch of rows (same shape conventions as the one-shot functions)."""
        X2, Y2 = _rows(X, Y, mask, same_width=self._same_width)
        if X2.shape[0] == 0:
            return
        Xd = X2.to(self.dtype)
        Yd = Y2.to(self.dtype)
        if self._shift_x is None:
            self._start(Xd, Yd)
        elif Xd.shape[1] != self._shift_x.shape[0] or Yd.shape[1] != self._shift_y.shape[0]:
            raise AnalysisError(
                f"batch widths ({Xd.shape[1]}, {Yd.shape[1]}) differ from the first batch's "
                f"({self._shift_x.shape[0]}, {self._shift_y.shape[0]}); use one accumulator per layer"
            )
        Xd = Xd.to(self._shift_x.device)
        Yd = Yd.to(self._shift_x.device)
        self._update_grams(Xd - self._shift_x, Yd - self._shift_y)
        self._update_rowwise(Xd, Yd)
        self.count += Xd.shape[0]

    def _start(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        self._shift_x = X.mean(0)
        self._shift_y = Y.mean(0)
        hx, hy = X.shape[1], Y.shape[1]
        zeros = lambda *shape: torch.zeros(shape, dtype=self.dtype, device=X.device)  # noqa: E731
        self._sum_x, self._sum_y = zeros(hx), zeros(hy)
        self._xx, self._yy, self._yx = zeros(hx, hx), zeros(hy, hy), zeros(hy, hx)

    def _update_grams(self, Xs: torch.Tensor, Ys: torch.Tensor) -> None:
        self._sum_x += Xs.sum(0)
        self._sum_y += Ys.sum(0)
        self._xx += Xs.T @ Xs
        self._yy += Ys.T @ Ys
        self._yx += Ys.T @ Xs

    def _update_rowwise(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        """Hook for subclasses that also track row-wise statistics."""

    def cka(self) -> float:
        """Linear CKA of all rows seen so far."""
        _require_rows(self.count)
        n = self.count
        mean_x = self._sum_x / n
        mean_y = self._sum_y / n
        # Σ(x−μ)(x−μ)ᵀ = Σ x xᵀ − n μ μᵀ, on the shifted rows.
        xx = self._xx - n * torch.outer(mean_x, mean_x)
        yy = self._yy - n * torch.outer(mean_y, mean_y)
        yx = self._yx - n * torch.outer(mean_y, mean_x)
        return _cka_from_centered_grams(xx, yy, yx)

    def result(self) -> dict[str, float]:
        return {"cka": self.cka(), "count": self.count}


class SimilarityAccumulator(CKAAccumulator):
    """CKA plus mean cosine, mean L2, relative L2 and both mean row norms over rows fed in batches.

    X is the reference and Y the compared run; both must have the same width.
    """

    _same_width = True

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__(dtype)
        self._sum_cos = 0.0
        self._sum_dist = 0.0
        self._sum_ref_norm = 0.0
        self._sum_norm = 0.0

    def _update_rowwise(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        cos, dist, x_norm = _rowwise(X, Y)
        # Kept as device tensors (0.0 + tensor -> tensor) so a GPU pipeline does not sync per batch.
        self._sum_cos = self._sum_cos + cos.sum()
        self._sum_dist = self._sum_dist + dist.sum()
        self._sum_ref_norm = self._sum_ref_norm + x_norm.sum()
        self._sum_norm = self._sum_norm + torch.linalg.vector_norm(Y, dim=1).sum()

    def mean_norm(self) -> float:
        """mean_n ‖Y_n‖₂: the compared run's mean activation norm (the study's target_mean_norm)."""
        _require_rows(self.count)
        return float(self._sum_norm) / self.count

    def reference_mean_norm(self) -> float:
        """mean_n ‖X_n‖₂ (the study's baseline_mean_norm)."""
        _require_rows(self.count)
        return float(self._sum_ref_norm) / self.count

    def cosine(self) -> float:
        _require_rows(self.count)
        return float(self._sum_cos) / self.count

    def l2(self) -> float:
        _require_rows(self.count)
        return float(self._sum_dist) / self.count

    def relative_l2(self) -> float:
        _require_rows(self.count)
        ref_norm = float(self._sum_ref_norm)
        return float(self._sum_dist) / ref_norm if ref_norm > 0 else float("inf")

    def result(self) -> dict[str, float]:
        """``{"cka", "cosine", "l2", "relative_l2", "mean_norm", "reference_mean_norm", "count"}``."""
        return {
            "cka": self.cka(),
            "cosine": self.cosine(),
            "l2": self.l2(),
            "relative_l2": self.relative_l2(),
            "mean_norm": self.mean_norm(),
            "reference_mean_norm": self.reference_mean_norm(),
            "count": self.count,
        }
