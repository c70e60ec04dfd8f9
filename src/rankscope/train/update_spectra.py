"""Spectral norms of weights, factors and updates of parameterized layers, without a dense SVD.

A layer's weight W (and the update ΔW = W_after − W_before of one optimizer step) is described
as an `Operator`: a sum of dense, low-rank (s·B·A) and sparse terms that is only ever applied to
vectors. Its largest singular value comes from block power iteration with a Rayleigh–Ritz
estimate. Operators of the same structure (every q/k/v/o of a model, say) are iterated together
as one batch along a leading dimension, so a measurement of a whole model converges as one.

Updates of factored layers are kept factored, s·(B'·A' − B·A) = s·(ΔB·A' + B·ΔA), with the
differences ΔB, ΔA formed first: a difference of nearby floats is exact, so an update 1e-6 the size
of the weight is measured to full precision, where B'A' − BA in float32 would lose ~1e-3 of it.

Memory: a term holds the layer's own tensors (its parameters, and the snapshot taken before the
step), never a copy of them; a difference is a pair (after, before). Each product widens one map's
tensors to float32 (and forms its differences) just for that product, one map at a time, so a
measurement needs the snapshot plus about one matrix in float32 (docs/internals.md has the
measured figures), where stacked float32 copies of every weight and update needed 3.3x the
float32 size of the targeted weights under bf16-pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

BLOCK = 8  # vectors iterated together


@dataclass(frozen=True)
class Difference:
    """after − before of one tensor, formed in at least float32 only while a product uses it."""

    after: torch.Tensor
    before: torch.Tensor


Matrix = torch.Tensor | Difference


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _value(matrix: Matrix) -> torch.Tensor:
    """A term's values in at least float32, for one product."""
    if isinstance(matrix, Difference):
        return _wide(matrix.after) - _wide(matrix.before)
    return _wide(matrix)


def _tensors_of(matrix: Matrix) -> list[torch.Tensor]:
    return [matrix.after, matrix.before] if isinstance(matrix, Difference) else [matrix]


def _shape_of(matrix: Matrix) -> tuple[int, ...]:
    return tuple((matrix.after if isinstance(matrix, Difference) else matrix).shape)


@dataclass(frozen=True)
class SparseTerm:
    """sign · S where S holds `values` at the flat positions `index` (row·n + col) of each map."""

    index: list[torch.Tensor]  # per map, (nnz,) integer positions
    values: list[Matrix]  # per map, (nnz,)
    sign: float = 1.0

    def values_of(self, map_index: int, dtype: torch.dtype) -> torch.Tensor:
        values = _value(self.values[map_index]).to(dtype)
        return values if self.sign == 1.0 else self.sign * values


@dataclass
class Operator:
    """L linear maps Rⁿ → Rᵐ, each the sum of the same kinds of terms. A term has one entry per
    map: `dense[i][l]` is map l's i-th dense matrix (m, n); `lowrank[i]` is (scale, [B_l (m, r)],
    [A_l (r, n)]); `sparse[i]` a SparseTerm. Entries are tensors as the layer holds them (any
    dtype) or Differences; products widen them map by map."""

    shape: tuple[int, int, int]  # (L, m, n)
    dense: list[list[Matrix]] = field(default_factory=list)
    lowrank: list[tuple[float, list[Matrix], list[Matrix]]] = field(default_factory=list)
    sparse: list[SparseTerm] = field(default_factory=list)

    def matmul(self, V: torch.Tensor) -> torch.Tensor:
        """(L, n, k) -> (L, m, k)."""
        L, m, n = self.shape
        out = torch.zeros(L, m, V.shape[-1], dtype=V.dtype, device=V.device)
        for index in range(L):
            v, o = V[index], out[index]
            for matrices in self.dense:
                o += _value(matrices[index]).to(V.dtype) @ v
            for scale, Bs, As in self.lowrank:
                o += scale * (_value(Bs[index]).to(V.dtype) @ (_value(As[index]).to(V.dtype) @ v))
            for term in self.sparse:
                rows, cols = _coords(term.index[index], n)
                _scatter(o, rows, v, cols, term.values_of(index, V.dtype))
        return out

    def rmatmul(self, U: torch.Tensor) -> torch.Tensor:
        """(L, m, k) -> (L, n, k): the transpose applied."""
        L, m, n = self.shape
        out = torch.zeros(L, n, U.shape[-1], dtype=U.dtype, device=U.device)
        for index in range(L):
            u, o = U[index], out[index]
            for matrices in self.dense:
                o += _value(matrices[index]).to(U.dtype).mT @ u
            for scale, Bs, As in self.lowrank:
                o += scale * (_value(As[index]).to(U.dtype).mT @ (_value(Bs[index]).to(U.dtype).mT @ u))
            for term in self.sparse:
                rows, cols = _coords(term.index[index], n)
                _scatter(o, cols, u, rows, term.values_of(index, U.dtype))
        return out

    @property
    def empty(self) -> bool:
        return not (self.dense or self.lowrank or self.sparse)

    def signature(self) -> tuple:
        """What must agree for two operators to be iterated as one batch."""
        return (self.shape[1:], tuple(_shape_of(d[0]) for d in self.dense),
                tuple((s, _shape_of(B[0]), _shape_of(A[0])) for s, B, A in self.lowrank),
                tuple((t.sign, _shape_of(t.values[0])) for t in self.sparse))

    def tensors(self) -> list[torch.Tensor]:
        """Every floating tensor the operator reads (they decide the iteration's dtype and device)."""
        entries = [m for d in self.dense for m in d] + [m for _, B, A in self.lowrank for m in (*B, *A)]
        entries += [m for t in self.sparse for m in t.values]
        return [t for entry in entries for t in _tensors_of(entry)]


def _coords(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of flat positions in an (m, n) matrix, formed per product (int64 coordinates
    of every sparse entry would be 4x the size of its float32 values)."""
    flat = index.long()
    return flat // n, flat % n


def _scatter(out: torch.Tensor, out_index: torch.Tensor, source: torch.Tensor, source_index: torch.Tensor,
             values: torch.Tensor) -> None:
    """out[out_index[j]] += values[j] · source[source_index[j]] for every j (one map)."""
    out.index_add_(0, out_index, source[source_index] * values.reshape(-1, 1))


def as_operator(matrix: torch.Tensor) -> Operator:
    """One dense matrix (m, n), or L of them stacked (L, m, n); held, not copied."""
    stacked = matrix if matrix.dim() == 3 else matrix.unsqueeze(0)
    return Operator(tuple(stacked.shape), dense=[list(stacked.unbind(0))])


def difference_operator(after: torch.Tensor, before: torch.Tensor) -> Operator:
    """after − before of one matrix (m, n), formed only inside each product."""
    return Operator((1, *after.shape), dense=[[Difference(after, before)]])


def stack(operators: list[Operator]) -> Operator:
    """Operators of one signature as one batch: lists of their entries, no tensor is copied."""
    first = operators[0]
    if len(operators) == 1:
        return first
    return Operator(
        (sum(op.shape[0] for op in operators), *first.shape[1:]),
        dense=[[m for op in operators for m in op.dense[i]] for i in range(len(first.dense))],
        lowrank=[(first.lowrank[i][0], [B for op in operators for B in op.lowrank[i][1]],
                  [A for op in operators for A in op.lowrank[i][2]]) for i in range(len(first.lowrank))],
        sparse=[SparseTerm([x for op in operators for x in op.sparse[i].index],
                           [v for op in operators for v in op.sparse[i].values], first.sparse[i].sign)
                for i in range(len(first.sparse))],
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


def weight_operator(module: nn.Module, t: dict[str, torch.Tensor]) -> Operator | None:
    """W of the layer from its tensors `t` (held, not copied); None when the layer has no dense
    equivalent."""
    kind = _kind(module)
    shape = (1, module.out_features, module.in_features)
    if kind == "dense":
        return Operator(shape, dense=[[t["weight"]]])
    if kind == "lowrank":
        return Operator(shape, lowrank=[(1.0, [t["B"]], [t["A"]])])
    if kind == "lora":
        return Operator(shape, dense=[[t["weight"]]], lowrank=[(module.scale, [t["B"]], [t["A"]])])
    if kind == "sparse_lowrank":
        return Operator(shape, lowrank=[(module.scale, [t["B"]], [t["A"]])],
                        sparse=[SparseTerm([t["sparse_index"]], [t["sparse_values"]])])
    if kind == "generic" and "__effective__" in t:
        return Operator(shape, dense=[[t["__effective__"]]])
    return None


def update_operator(module: nn.Module, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> Operator | None:
    """ΔW = W_after − W_before of the layer, factored where the layer is. A dense term that did
    not change (LoRA's frozen W0 between merges) is dropped."""
    kind = _kind(module)
    shape = (1, module.out_features, module.in_features)

    def diff(name: str) -> Difference:
        return Difference(after[name], before[name])

    def factored(scale: float) -> list[tuple[float, list[Matrix], list[Matrix]]]:
        return [(scale, [diff("B")], [after["A"]]), (scale, [before["B"]], [diff("A")])]

    if kind == "dense":
        return Operator(shape, dense=[[diff("weight")]])
    if kind == "lowrank":
        return Operator(shape, lowrank=factored(1.0))
    if kind == "lora":
        changed = not torch.equal(after["weight"], before["weight"])
        return Operator(shape, dense=[[diff("weight")]] if changed else [], lowrank=factored(module.scale))
    if kind == "sparse_lowrank":
        op = Operator(shape, lowrank=factored(module.scale))
        if torch.equal(before["sparse_index"], after["sparse_index"]):
            op.sparse.append(SparseTerm([after["sparse_index"]], [diff("sparse_values")]))
        else:  # a new support: subtract the old sparse part, add the new one
            op.sparse += [SparseTerm([after["sparse_index"]], [after["sparse_values"]]),
                          SparseTerm([before["sparse_index"]], [before["sparse_values"]], sign=-1.0)]
        return op
    if kind == "generic" and "__effective__" in after:
        return Operator(shape, dense=[[diff("__effective__")]])
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
