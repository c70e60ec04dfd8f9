"""Spectral norms of weights, factors and updates of parameterized layers, without a dense SVD.

A layer's weight W (and the update ΔW = W_after − W_before of one optimizer step) is described
as an `Operator`: a sum of dense, low-rank (s·B·A) and sparse terms that is only ever applied to
vectors. Its largest singular value comes from block power iteration with a Rayleigh–Ritz
estimate. Operators of the same structure (every q/k/v/o of a model, say) are stacked along a
leading batch dimension and iterated together, so a measurement of a whole model is a handful
of batched matrix products per iteration instead of one small product per matrix.

Updates of factored layers are kept factored, s·(B'·A' − B·A) = s·(ΔB·A' + B·ΔA), with the
differences ΔB, ΔA formed first: a difference of nearby floats is exact, so an update 1e-6 the size
of the weight is measured to full precision, where B'A' − BA in float32 would lose ~1e-3 of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

BLOCK = 8  # vectors iterated together


@dataclass
class Operator:
    """L linear maps Rⁿ → Rᵐ, each the sum of the same kinds of terms, with a leading batch
    dimension L on every tensor: dense (L, m, n); low-rank scale·B·A with B (L, m, r), A (L, r, n);
    sparse entries at flat positions (rows·n + cols) with values (L, nnz)."""

    shape: tuple[int, int, int]  # (L, m, n)
    dense: list[torch.Tensor] = field(default_factory=list)
    lowrank: list[tuple[float, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    sparse: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # rows, cols, values

    def matmul(self, V: torch.Tensor) -> torch.Tensor:
        """(L, n, k) -> (L, m, k)."""
        L, m, n = self.shape
        out = torch.zeros(L, m, V.shape[-1], dtype=V.dtype, device=V.device)
        for matrix in self.dense:
            out += matrix @ V
        for scale, B, A in self.lowrank:
            out += scale * (B @ (A @ V))
        for rows, cols, values in self.sparse:
            _scatter(out, rows, V, cols, values)
        return out

    def rmatmul(self, U: torch.Tensor) -> torch.Tensor:
        """(L, m, k) -> (L, n, k): the transpose applied."""
        L, m, n = self.shape
        out = torch.zeros(L, n, U.shape[-1], dtype=U.dtype, device=U.device)
        for matrix in self.dense:
            out += matrix.mT @ U
        for scale, B, A in self.lowrank:
            out += scale * (A.mT @ (B.mT @ U))
        for rows, cols, values in self.sparse:
            _scatter(out, cols, U, rows, values)
        return out

    @property
    def empty(self) -> bool:
        return not (self.dense or self.lowrank or self.sparse)

    def signature(self) -> tuple:
        """What must agree for two operators to be stacked into one batch."""
        return (self.shape[1:], tuple(d.shape[1:] for d in self.dense),
                tuple((s, B.shape[1:], A.shape[1:]) for s, B, A in self.lowrank),
                tuple(v.shape[1:] for _, _, v in self.sparse))

    def tensors(self) -> list[torch.Tensor]:
        return self.dense + [t for _, B, A in self.lowrank for t in (B, A)] + [v for _, _, v in self.sparse]


def _scatter(out: torch.Tensor, out_index: torch.Tensor, source: torch.Tensor, source_index: torch.Tensor,
             values: torch.Tensor) -> None:
    """out[l, out_index[l, j]] += values[l, j] · source[l, source_index[l, j]] for every l, j."""
    L, rows_out, k = out.shape
    rows_in = source.shape[1]
    batch = torch.arange(L, device=out.device)[:, None]
    gathered = source.reshape(L * rows_in, k)[(source_index + batch * rows_in).reshape(-1)]
    out.view(L * rows_out, k).index_add_(0, (out_index + batch * rows_out).reshape(-1), gathered * values.reshape(-1, 1))


def as_operator(matrix: torch.Tensor) -> Operator:
    """One dense matrix (m, n), or a stack of them (L, m, n)."""
    stacked = matrix if matrix.dim() == 3 else matrix.unsqueeze(0)
    return Operator(tuple(stacked.shape), dense=[stacked])


def stack(operators: list[Operator]) -> Operator:
    """Operators of one signature as one batch."""
    first = operators[0]
    if len(operators) == 1:
        return first
    cat = torch.cat
    return Operator(
        (sum(op.shape[0] for op in operators), *first.shape[1:]),
        dense=[cat([op.dense[i] for op in operators]) for i in range(len(first.dense))],
        lowrank=[(first.lowrank[i][0], cat([op.lowrank[i][1] for op in operators]), cat([op.lowrank[i][2] for op in operators]))
                 for i in range(len(first.lowrank))],
        sparse=[tuple(cat([op.sparse[i][j] for op in operators]) for j in range(3)) for i in range(len(first.sparse))],
    )


def spectral_norms(op: Operator, iters: int = 30, tol: float = 1e-4, block: int = BLOCK,
                   v0: torch.Tensor | None = None, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest singular value of each of the L maps by block power iteration on opᵀ·op (subspace
    iteration with a Rayleigh–Ritz estimate); returns (σ₁ of shape (L,), the right-vector blocks
    (L, n, k) for a warm start).

    A block of k vectors converges at the rate σ_{k+1}/σ₁ instead of σ₂/σ₁, which matters for
    Adam-like updates whose top singular values lie close together. Estimates never exceed σ₁;
    iteration stops after `iters` steps or when every estimate changes by less than `tol`.
    """
    L, m, n = op.shape
    k = max(1, min(block, m, n))
    tensors = op.tensors()
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    device = tensors[0].device if tensors else torch.device("cpu")
    if op.empty:
        return torch.zeros(L, dtype=dtype), torch.zeros(L, n, k, dtype=dtype)
    if v0 is not None and v0.shape == (L, n, k):
        V = v0.to(device=device, dtype=dtype)
    else:
        V = torch.randn(L, n, k, generator=generator, dtype=dtype).to(device)
    V = torch.linalg.qr(V)[0]
    sigma = torch.zeros(L, dtype=dtype, device=device)
    for _ in range(max(1, iters)):
        U = op.matmul(V)
        # σ₁ restricted to span(V): the top eigenvalue of the k x k Gram matrix UᵀU.
        estimate = torch.linalg.eigvalsh(U.mT @ U)[:, -1].clamp_min(0).sqrt()
        converged = bool(((estimate - sigma).abs() <= tol * estimate).all())
        sigma = estimate
        if converged or not bool(torch.isfinite(estimate).all()):
            break
        V = torch.linalg.qr(op.rmatmul(U))[0]
    return sigma.cpu(), V


def spectral_norm(op: Operator | torch.Tensor, iters: int = 30, tol: float = 1e-4, block: int = BLOCK,
                  v0: torch.Tensor | None = None, generator: torch.Generator | None = None) -> tuple[float, torch.Tensor]:
    """σ₁ of one matrix or one-map operator (see `spectral_norms`)."""
    if isinstance(op, torch.Tensor):
        op = as_operator(op)
    if op.shape[0] != 1:
        raise ValueError(f"spectral_norm takes one map; this operator holds {op.shape[0]} (use spectral_norms)")
    sigmas, V = spectral_norms(op, iters, tol, block, v0, generator)
    return float(sigmas[0]), V


# ---------------------------------------------------------------------------------------------
# the weight and update operators of each kind of layer


def _kind(module: nn.Module) -> str:
    from rankscope.nn import ColaLinear, LoRALinear, LowRankLinear, SparsePlusLowRankLinear

    if isinstance(module, nn.Linear):
        return "dense"
    if isinstance(module, LowRankLinear):
        return "lowrank"
    if isinstance(module, LoRALinear):
        return "lora"
    if isinstance(module, SparsePlusLowRankLinear):
        return "sparse_lowrank"
    if isinstance(module, ColaLinear):
        return "none"  # B·σ(A·x): no dense weight, only factors
    return "generic"  # any other layer: through its effective_weight()


def _named_tensors(module: nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the layer's tensors (for a layer known only through
    `effective_weight()`, of that dense weight too), taken before the optimizer step."""
    return {name: t.clone() for name, t in current(module).items()}


def current(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {name: t.detach() for name, t in _named_tensors(module)}
    if _kind(module) == "generic":
        weight = module.effective_weight()
        if weight is not None:
            tensors["__effective__"] = weight.detach().float()
    return tensors


def _f32(t: torch.Tensor) -> torch.Tensor:
    """At least float32, with the batch dimension of one map."""
    t = t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t.unsqueeze(0)


def _sparse_coords(module: nn.Module, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    index = t["sparse_index"].long().unsqueeze(0)
    return index // module.in_features, index % module.in_features


def weight_operator(module: nn.Module, t: dict[str, torch.Tensor]) -> Operator | None:
    """W of the layer from its tensors `t`; None when the layer has no dense equivalent."""
    kind = _kind(module)
    shape = (1, module.out_features, module.in_features)
    if kind == "dense":
        return Operator(shape, dense=[_f32(t["weight"])])
    if kind == "lowrank":
        return Operator(shape, lowrank=[(1.0, _f32(t["B"]), _f32(t["A"]))])
    if kind == "lora":
        return Operator(shape, dense=[_f32(t["weight"])], lowrank=[(module.scale, _f32(t["B"]), _f32(t["A"]))])
    if kind == "sparse_lowrank":
        rows, cols = _sparse_coords(module, t)
        return Operator(shape, lowrank=[(module.scale, _f32(t["B"]), _f32(t["A"]))],
                        sparse=[(rows, cols, _f32(t["sparse_values"]))])
    if kind == "generic" and "__effective__" in t:
        return Operator(shape, dense=[_f32(t["__effective__"])])
    return None


def update_operator(module: nn.Module, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> Operator | None:
    """ΔW = W_after − W_before of the layer, factored where the layer is. A dense term that did
    not change (LoRA's frozen W0 between merges) is dropped."""
    kind = _kind(module)
    shape = (1, module.out_features, module.in_features)

    def diff(name: str) -> torch.Tensor:
        return _f32(after[name]) - _f32(before[name])

    def factored(scale: float) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
        return [(scale, diff("B"), _f32(after["A"])), (scale, _f32(before["B"]), diff("A"))]

    if kind == "dense":
        return Operator(shape, dense=[diff("weight")])
    if kind == "lowrank":
        return Operator(shape, lowrank=factored(1.0))
    if kind == "lora":
        dense = diff("weight")
        return Operator(shape, dense=[dense] if bool(dense.any()) else [], lowrank=factored(module.scale))
    if kind == "sparse_lowrank":
        op = Operator(shape, lowrank=factored(module.scale))
        rows, cols = _sparse_coords(module, after)
        if torch.equal(before["sparse_index"], after["sparse_index"]):
            op.sparse.append((rows, cols, diff("sparse_values")))
        else:  # a new support: subtract the old sparse part, add the new one
            old_rows, old_cols = _sparse_coords(module, before)
            op.sparse += [(rows, cols, _f32(after["sparse_values"])), (old_rows, old_cols, -_f32(before["sparse_values"]))]
        return op
    if kind == "generic" and "__effective__" in after:
        return Operator(shape, dense=[diff("__effective__")])
    return None


def factor_names(module: nn.Module) -> dict[str, str]:
    """Factor label (B, A) -> the name of its tensor in the layer."""
    if not hasattr(module, "factors"):
        return {}
    by_id = {id(p): name for name, p in _named_tensors(module)}
    return {label: by_id[id(tensor)] for label, tensor in module.factors().items() if id(tensor) in by_id}


def batched_norms(items: list[tuple[str, Operator]], iters: int, warm: dict[tuple, torch.Tensor],
                  generator: torch.Generator, label: str = "") -> dict[str, float | None]:
    """σ₁ of every (name, operator), operators of one signature iterated as one batch; `warm`
    keeps each batch's vectors for the next call."""
    groups: dict[tuple, list[tuple[str, Operator]]] = {}
    for name, op in items:
        groups.setdefault(op.signature(), []).append((name, op))
    out: dict[str, float | None] = {}
    for members in groups.values():
        names = tuple(name for name, _ in members)
        op = stack([op for _, op in members])
        key = (label, names)
        sigmas, V = spectral_norms(op, iters, v0=warm.get(key), generator=generator)
        warm[key] = V
        for name, sigma in zip(names, sigmas.tolist()):
            out[name] = sigma if math.isfinite(sigma) else None
    return out
