"""SLTrain: W = s·B·A + S, S sparse on a fixed random support, trained without a dense weight."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rankscope.errors import ConfigError

from .base import ParameterizedLinear, check_from_linear, kaiming_uniform_a_sqrt5_, seeded_init_
from .lora import check_alpha


def _dense_weight(
    A: torch.Tensor, B: torch.Tensor, values: torch.Tensor, index: torch.Tensor, scale: float
) -> torch.Tensor:
    """s·B·A with the sparse values added at their flattened positions (a fresh out x in tensor)."""
    weight = scale * (B @ A)
    # The support has no repeated positions, so add == scatter; index_add_ accepts int32 indices.
    weight.view(-1).index_add_(0, index, values.to(weight.dtype))
    return weight


class _SparsePlusLowRankMatmul(torch.autograd.Function):
    """y = x·Wᵀ with W = s·B·A + S formed only transiently.

    Autograd on the plain formula would save the dense W (out x in) for the backward of every
    layer at once; here only x and the compact pieces (A, B, values, index) are saved, and the
    backward rebuilds what it needs.

    Mixed precision: under autocast the forward's matmuls run in the autocast dtype, so the
    output (and hence grad_out) has it. The backward runs outside autocast, so it casts the saved
    tensors to grad_out's dtype itself: the same arithmetic autocast would have chosen, on any
    device. Autograd casts each returned gradient back to its input's dtype.
    """

    @staticmethod
    def forward(ctx, x, A, B, values, index, scale):  # type: ignore[override]
        weight = _dense_weight(A, B, values, index, scale)
        ctx.save_for_backward(x, A, B, values, index)
        ctx.scale = scale
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, A, B, values, index = ctx.saved_tensors
        compute = grad_out.dtype
        x, A, B, values = (t.to(compute) for t in (x, A, B, values))
        scale = ctx.scale
        need_x, need_A, need_B, need_values = ctx.needs_input_grad[:4]
        grad_x = grad_A = grad_B = grad_values = None

        if need_x:
            weight = _dense_weight(A, B, values, index, scale)
            grad_x = grad_out @ weight
            del weight  # free it before the weight gradient is formed: one dense matrix at a time

        if need_A or need_B or need_values:
            out_features, in_features = B.shape[0], A.shape[1]
            flat_grad = grad_out.reshape(-1, out_features)
            flat_x = x.reshape(-1, in_features)
            n_tokens = flat_x.shape[0]
            # grad_values[k] = Σ_n g[n, i_k]·x[n, j_k] at the support only. Doing that literally
            # costs n·nnz multiply-adds but as a gather it needs an (n x nnz) temporary (or a
            # chunked loop) and runs memory-bound; at δ = 3% with thousands of tokens per
            # micro-batch it is both larger and slower than one dense GEMM gᵀ·x (n·out·in flops at
            # matmul speed, one out x in temporary: the same size the forward already formed),
            # then a gather. So we form the dense weight gradient transiently and gather from it.
            grad_weight = flat_grad.T @ flat_x if need_values else None
            if need_values:
                grad_values = grad_weight.view(-1).index_select(0, index)
            # grad_A = s·Bᵀ·G_W and grad_B = s·G_W·Aᵀ. Once G_W exists (it does whenever the
            # values train) that costs r·out·in flops; through the bottleneck ((g·B)ᵀ·x and
            # gᵀ·(x·Aᵀ)) it costs n·r·(in + out). Take the cheaper; both are exact.
            reuse_weight_grad = grad_weight is not None and n_tokens * (in_features + out_features) >= (
                in_features * out_features
            )
            if reuse_weight_grad:
                if need_A:
                    grad_A = scale * (B.T @ grad_weight)
                if need_B:
                    grad_B = scale * (grad_weight @ A.T)
            else:
                if need_A:
                    grad_A = scale * ((flat_grad @ B).T @ flat_x)
                if need_B:
                    grad_B = scale * (flat_grad.T @ (flat_x @ A.T))
            del grad_weight

        return grad_x, grad_A, grad_B, grad_values, None, None


def support_size(density: float, in_features: int, out_features: int) -> int:
    """SLTrain's int(sp_ratio · out · in): the product rounded down."""
    return int(density * in_features * out_features)


class SparsePlusLowRankLinear(ParameterizedLinear):
    """SLTrain's layer: y = x·(s·B·A + S)ᵀ, s = α/r, or s = tanh(c) for a trained scalar c that
    starts at 1 with ``trainable_scaling`` (SLTrain's --train_scaling).

    S lives on a fixed, uniformly random support of int(δ·out·in) positions drawn without
    replacement at init. The flattened positions are the persistent buffer ``sparse_index``
    (int32 below 2^31 entries, so a checkpoint restores the same support); only
    ``sparse_values`` train. A starts Kaiming-uniform, B at zero, values U(±1/√in).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float = 32.0,
        density: float = 0.03,
        *,
        trainable_scaling: bool = False,
        name: str = "",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, rank, name)
        check_alpha(alpha, name)
        label = name or "<unnamed>"
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density < 1.0:
            raise ConfigError(
                f"density {density!r} must be in (0, 1) for layer {label}; set method.density to a fraction such as 0.03"
            )
        n_entries = in_features * out_features
        n_support = support_size(density, in_features, out_features)
        if n_support < 1:
            raise ConfigError(
                f"density {density} gives no sparse entries in the {out_features}x{in_features} layer {label}; "
                "raise method.density"
            )
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.density = float(density)

        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.sparse_values = nn.Parameter(torch.empty(n_support, device=device, dtype=dtype))
        self.scaling = (
            nn.Parameter(torch.ones(1, device=device, dtype=dtype)) if trainable_scaling else None
        )
        index_dtype = torch.int32 if n_entries < 2**31 else torch.int64
        self.register_buffer(
            "sparse_index", torch.empty(n_support, dtype=index_dtype, device=device), persistent=True
        )
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw a new support and fresh values and factors."""
        n_entries = self.in_features * self.out_features
        draw_device = generator.device if generator is not None else self.sparse_index.device
        support = torch.randperm(n_entries, generator=generator, device=draw_device)[: self.sparse_index.numel()]
        # Sorted positions make the gather/scatter walk memory in order.
        support, _ = torch.sort(support)
        with torch.no_grad():
            self.sparse_index.copy_(support.to(self.sparse_index.dtype))
        kaiming_uniform_a_sqrt5_(self.A, generator)
        with torch.no_grad():
            self.B.zero_()
        bound = 1.0 / math.sqrt(self.in_features)
        seeded_init_(self.sparse_values, lambda t, generator: t.uniform_(-bound, bound, generator=generator), generator)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        alpha: float = 32.0,
        density: float = 0.03,
        *,
        trainable_scaling: bool = False,
        name: str = "",
        generator: torch.Generator | None = None,
    ) -> SparsePlusLowRankLinear:
        """A fresh layer with the shape, device and dtype of ``linear`` (its values are not used)."""
        check_from_linear(linear)
        return cls(
            linear.in_features,
            linear.out_features,
            rank,
            alpha,
            density,
            trainable_scaling=trainable_scaling,
            name=name,
            generator=generator,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # A checkpoint's support is data, so its size wins: runs saved before rankscope followed
        # SLTrain's int(δ·out·in) drew round(δ·out·in) positions. The tensors are resized in
        # place, so an optimizer built on this layer keeps pointing at its parameters.
        index = state_dict.get(prefix + "sparse_index")
        if index is not None and index.numel() != self.sparse_index.numel():
            self.sparse_index = torch.empty(index.shape, dtype=index.dtype, device=self.sparse_index.device)
            self.sparse_values.data = self.sparse_values.data.new_empty(index.numel())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _scaled_A(self) -> tuple[torch.Tensor, float]:
        """(A, s) for the product s·B·A; a trainable scale is folded into A, as SLTrain does."""
        if self.scaling is None:
            return self.A, self.scale
        return self.A * self.scaling.tanh(), 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, scale = self._scaled_A()
        return _SparsePlusLowRankMatmul.apply(x, A, self.B, self.sparse_values, self.sparse_index, scale)

    def effective_weight(self) -> torch.Tensor:
        A, scale = self._scaled_A()
        dense = scale * (self.B @ A)
        flat = dense.reshape(-1).index_add(0, self.sparse_index, self.sparse_values.to(dense.dtype))
        return flat.view(self.out_features, self.in_features)

    def factors(self) -> dict[str, torch.Tensor]:
        return {"B": self.B, "A": self.A}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, density={self.density}, nnz={self.sparse_index.numel()}"
