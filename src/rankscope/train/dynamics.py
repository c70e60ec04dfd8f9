"""Training dynamics, measured live: the update spectra that make low-rank training unstable.

Spectron's paper (Janson, Oyallon, Belilovsky 2026) traces the loss spikes of native low-rank
training to uncontrolled growth of the spectral norm of the weight *update* ΔW. Every
`train.dynamics_every` steps, and at every loss spike, this module measures for each targeted
matrix (q, k, v, o, gate, up, down of every block):

- ‖ΔW‖₂ of the step's update, ‖W‖₂, and ‖F‖₂, ‖ΔF‖₂ of each factor F (B, A);
- the update-to-weight ratio ‖ΔW‖₂ / ‖W‖₂;
- the gradient norm of every optimizer param group (before clipping) and its lr;

and a spike detector flags a step whose loss exceeds `train.spike_factor` × the median of the
previous `train.spike_window` losses, listing the matrices whose update norm (per unit lr) jumped
by the same factor over their own median of earlier measurements.

Spectral norms come from power iteration on an implicit operator, never a dense SVD: a factored
layer is applied through its factors (ΔW = ΔB·A' + B·ΔA, O(r·(m+n)) per product, and free of the
cancellation that B'A' − BA would suffer for updates 1e-5 of the weight), a dense layer through its
dense update W' − W. The iteration is warm-started from the previous measurement's vector and
draws its random starts from a private generator, so measuring never changes training: a run with
dynamics on is bit-identical to one with it off.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------
# implicit linear operators and power iteration


@dataclass
class Operator:
    """A sum of dense, low-rank (scale·B·A) and sparse terms, applied to a block of vectors
    (n x k) without ever forming the matrix."""

    shape: tuple[int, int]
    dense: list[torch.Tensor] = field(default_factory=list)
    lowrank: list[tuple[float, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    sparse: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # rows, cols, values

    def matmul(self, V: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.shape[0], V.shape[1], dtype=V.dtype, device=V.device)
        for matrix in self.dense:
            out += matrix @ V
        for scale, B, A in self.lowrank:
            out += scale * (B @ (A @ V))
        for rows, cols, values in self.sparse:
            out.index_add_(0, rows, values[:, None] * V[cols])
        return out

    def rmatmul(self, U: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.shape[1], U.shape[1], dtype=U.dtype, device=U.device)
        for matrix in self.dense:
            out += matrix.T @ U
        for scale, B, A in self.lowrank:
            out += scale * (A.T @ (B.T @ U))
        for rows, cols, values in self.sparse:
            out.index_add_(0, cols, values[:, None] * U[rows])
        return out

    @property
    def empty(self) -> bool:
        return not (self.dense or self.lowrank or self.sparse)


def as_operator(matrix: torch.Tensor) -> Operator:
    return Operator(tuple(matrix.shape), dense=[matrix])


BLOCK = 8  # vectors iterated together


def spectral_norm(op: Operator | torch.Tensor, iters: int = 30, tol: float = 1e-4, block: int = BLOCK,
                  v0: torch.Tensor | None = None, generator: torch.Generator | None = None) -> tuple[float, torch.Tensor]:
    """Largest singular value of `op` by block power iteration on opᵀ·op (subspace iteration with
    a Rayleigh–Ritz estimate); returns (σ₁, the block of right vectors, for a warm start).

    A block of a few vectors converges at the rate σ_{k+1}/σ₁ instead of σ₂/σ₁, which matters for
    Adam-like updates whose top singular values lie close together. The estimate never exceeds
    σ₁; iteration stops after `iters` steps or when it changes by less than `tol` (relative).
    """
    if isinstance(op, torch.Tensor):
        op = as_operator(op)
    n = op.shape[1]
    k = max(1, min(block, n, op.shape[0]))
    dtype, device = _compute_dtype(op), _device(op)
    if v0 is not None and v0.shape == (n, k):
        V = v0.to(device=device, dtype=dtype)
    else:
        V = torch.randn(n, k, generator=generator, dtype=dtype).to(device)
    V = torch.linalg.qr(V)[0]
    sigma = 0.0
    for _ in range(max(1, iters)):
        U = op.matmul(V)
        # σ₁ of op restricted to span(V): the top eigenvalue of the k x k Gram matrix UᵀU.
        estimate = float(torch.linalg.eigvalsh(U.T @ U)[-1].clamp_min(0).sqrt())
        if not math.isfinite(estimate) or estimate == 0.0:
            return estimate if math.isfinite(estimate) else math.nan, V
        converged = abs(estimate - sigma) <= tol * estimate
        sigma = estimate
        if converged:
            break
        V = torch.linalg.qr(op.rmatmul(U))[0]
    return sigma, V


def _compute_dtype(op: Operator) -> torch.dtype:
    tensors = op.dense + [B for _, B, _ in op.lowrank] + [values for _, _, values in op.sparse]
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _device(op: Operator) -> torch.device:
    for t in op.dense + [B for _, B, _ in op.lowrank] + [values for _, _, values in op.sparse]:
        return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# the weight and update operators of each kind of layer


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the module's tensors (and of its dense weight where only a generic
    `effective_weight()` describes it), taken before the optimizer step."""
    tensors = {name: t.detach().clone() for name, t in _named_tensors(module)}
    if _kind(module) == "generic":
        weight = module.effective_weight()
        if weight is not None:
            tensors["__effective__"] = weight.detach().float().clone()
    return tensors


def current(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {name: t.detach() for name, t in _named_tensors(module)}
    if _kind(module) == "generic":
        weight = module.effective_weight()
        if weight is not None:
            tensors["__effective__"] = weight.detach().float()
    return tensors


def _named_tensors(module: nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


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
    return "generic"


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _sparse_coords(module: nn.Module, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    index = t["sparse_index"].long()
    return index // module.in_features, index % module.in_features


def weight_operator(module: nn.Module, t: dict[str, torch.Tensor]) -> Operator | None:
    """W of the layer from its tensors `t`; None when the layer has no dense equivalent."""
    kind = _kind(module)
    shape = (module.out_features, module.in_features)
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
        return Operator(shape, dense=[t["__effective__"]])
    return None


def update_operator(module: nn.Module, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> Operator | None:
    """ΔW = W_after − W_before, kept factored: s·(B'·A' − B·A) = s·(ΔB·A' + B·ΔA).

    Differences of tensors are formed first (exact in floating point for nearby values), so an
    update 1e-5 the size of W is measured to full precision. A dense term that did not change
    (LoRA's frozen W0 between merges) is dropped.
    """
    kind = _kind(module)
    shape = (module.out_features, module.in_features)

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
        if torch.equal(before["sparse_index"], after["sparse_index"]):
            rows, cols = _sparse_coords(module, after)
            op.sparse.append((rows, cols, diff("sparse_values")))
        else:  # a new support (a reset): subtract the old sparse part, add the new one
            rows, cols = _sparse_coords(module, after)
            old_rows, old_cols = _sparse_coords(module, before)
            op.sparse += [(rows, cols, _f32(after["sparse_values"])), (old_rows, old_cols, -_f32(before["sparse_values"]))]
        return op
    if kind == "generic" and "__effective__" in after:
        return Operator(shape, dense=[after["__effective__"] - before["__effective__"]])
    return None


def factor_names(module: nn.Module) -> dict[str, str]:
    """Factor label (B, A) -> the name of its tensor in the module."""
    if not hasattr(module, "factors"):
        return {}
    by_id = {id(p): name for name, p in _named_tensors(module)}
    return {label: by_id[id(tensor)] for label, tensor in module.factors().items() if id(tensor) in by_id}


# ---------------------------------------------------------------------------------------------
# the loss-spike detector


class SpikeDetector:
    """A step's loss is a spike when it exceeds `factor` × the median of the previous `window`
    finite losses (at least half a window of history is needed before anything is flagged)."""

    def __init__(self, factor: float, window: int):
        self.factor = factor
        self.window = window
        self.history: deque[float] = deque(maxlen=window)

    def observe(self, loss: float) -> dict[str, float] | None:
        if not math.isfinite(loss):
            return None  # the trainer's non-finite guard handles these
        spike = None
        if len(self.history) >= max(2, self.window // 2):
            median = statistics.median(self.history)
            if median > 0 and loss > self.factor * median:
                spike = {"loss": loss, "median": median, "ratio": loss / median}
        self.history.append(loss)
        return spike


# ---------------------------------------------------------------------------------------------
# the monitor the trainer calls


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class DynamicsMonitor:
    """Two calls per step from the trainer: `before_update` once the step's loss and gradients
    exist (before clipping), `after_update` after the optimizer step and the method's after_step.
    `after_update` returns the keys to add to the step's metrics record ({} on most steps)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train_cfg: Any,
                 writer: Any = None, enabled: bool = True, seed: int = 0):
        from rankscope.models import iter_target_linears

        self.every = int(getattr(train_cfg, "dynamics_every", 0) or 0)
        self.enabled = enabled and self.every > 0
        self.iters = int(getattr(train_cfg, "dynamics_power_iters", 30))
        self.detector = SpikeDetector(float(getattr(train_cfg, "spike_factor", 1.2)),
                                      int(getattr(train_cfg, "spike_window", 50)))
        self.optimizer = optimizer
        self.writer = writer
        self.matrices = [(name, module) for name, _, _, module in iter_target_linears(model)] if self.enabled else []
        group_of = {id(p): index for index, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self.group_index = {name: next((group_of[id(p)] for p in module.parameters() if id(p) in group_of), None)
                            for name, module in self.matrices}
        self.generator = torch.Generator().manual_seed(seed)
        self.vectors: dict[tuple[str, str], torch.Tensor] = {}
        # Per matrix, the update norms per unit lr of earlier periodic measurements (spike baseline).
        self.update_history: dict[str, deque[float]] = {name: deque(maxlen=self.detector.window) for name, _ in self.matrices}
        self._pending: dict[str, Any] | None = None

    # -- the two hooks ---------------------------------------------------------------------
    def before_update(self, step: int, loss: torch.Tensor | float) -> None:
        """`step` is the 1-based number of the update about to be applied."""
        if not self.enabled:
            return
        spike = self.detector.observe(float(loss))
        periodic = step % self.every == 0
        if not (periodic or spike):
            self._pending = None
            return
        self._pending = {
            "trigger": "period" if periodic else "spike", "spike": spike,
            "groups": self._group_stats(),
            "before": {name: snapshot(module) for name, module in self.matrices},
        }

    def after_update(self, step: int, applied: bool = True) -> dict[str, Any]:
        pending, self._pending = self._pending, None
        if pending is None:
            return {}
        out: dict[str, Any] = {}
        if applied:
            started = time.perf_counter()
            dynamics = self._measure(pending["before"], pending["groups"])
            dynamics["trigger"] = pending["trigger"]
            dynamics["seconds"] = time.perf_counter() - started
            out["dynamics"] = dynamics
        if pending["spike"] is not None:
            out["spike"] = {**pending["spike"], "matrices": self._jumped(out.get("dynamics"))}
        if applied and pending["trigger"] == "period":
            self._remember(out["dynamics"])
        self._log_tensorboard(step, out)
        return out

    # -- measurement -----------------------------------------------------------------------
    def _group_stats(self) -> dict[str, dict[str, float | None]]:
        stats = {}
        for index, group in enumerate(self.optimizer.param_groups):
            grads = [p.grad for p in group["params"] if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0
            stats[str(group.get("name", f"group{index}"))] = {"grad_norm": _finite_or_none(norm), "lr": float(group["lr"])}
        return stats

    def _norm(self, name: str, label: str, op: Operator | None) -> float | None:
        if op is None:
            return None
        if op.empty:
            return 0.0
        sigma, vector = spectral_norm(op, self.iters, v0=self.vectors.get((name, label)), generator=self.generator)
        self.vectors[(name, label)] = vector
        return _finite_or_none(sigma)

    @torch.no_grad()
    def _measure(self, before: dict[str, dict[str, torch.Tensor]], groups: dict[str, Any]) -> dict[str, Any]:
        matrices: dict[str, dict[str, float | None]] = {}
        for name, module in self.matrices:
            old, new = before[name], current(module)
            row = {"dW": self._norm(name, "dW", update_operator(module, old, new)),
                   "W": self._norm(name, "W", weight_operator(module, new))}
            for label, tensor_name in factor_names(module).items():
                row[label] = self._norm(name, label, as_operator(_f32(new[tensor_name])))
                row[f"d{label}"] = self._norm(name, f"d{label}", as_operator(_f32(new[tensor_name]) - _f32(old[tensor_name])))
            if row["dW"] is not None and row["W"]:
                row["ratio"] = row["dW"] / row["W"]
            matrices[name] = row
        updates = {n: r["dW"] for n, r in matrices.items() if r["dW"] is not None}
        ratios = [r["ratio"] for r in matrices.values() if r.get("ratio") is not None]
        factor_updates = [v for r in matrices.values() for k, v in r.items() if k in ("dA", "dB") and v is not None]
        worst = max(updates, key=updates.get) if updates else None
        return {
            "max_update_norm": updates[worst] if worst else None, "max_update_matrix": worst,
            "max_update_ratio": max(ratios) if ratios else None,
            "median_update_ratio": statistics.median(ratios) if ratios else None,
            "max_factor_update_norm": max(factor_updates) if factor_updates else None,
            "groups": groups, "matrices": matrices,
        }

    def _per_lr(self, name: str, row: dict[str, Any], groups: dict[str, Any]) -> float | None:
        """A matrix's update norm divided by its group's lr (Adam-like steps scale with lr, so
        warm-up and decay do not read as jumps); for CoLA the larger factor update."""
        value = row.get("dW")
        if value is None:
            value = max((row[k] for k in ("dA", "dB") if row.get(k) is not None), default=None)
        index = self.group_index.get(name)
        if value is None or index is None:
            return None
        lr = float(self.optimizer.param_groups[index]["lr"])
        return value / lr if lr > 0 else None

    def _remember(self, dynamics: dict[str, Any]) -> None:
        for name, row in dynamics["matrices"].items():
            value = self._per_lr(name, row, dynamics["groups"])
            if value is not None:
                self.update_history[name].append(value)

    def _jumped(self, dynamics: dict[str, Any] | None) -> list[dict[str, Any]]:
        """Matrices whose update norm per unit lr exceeds spike_factor × their median so far,
        largest jump first."""
        if dynamics is None:
            return []
        jumped = []
        for name, row in dynamics["matrices"].items():
            value = self._per_lr(name, row, dynamics["groups"])
            history = self.update_history.get(name)
            if value is None or not history:
                continue
            median = statistics.median(history)
            if median > 0 and value > self.detector.factor * median:
                jumped.append({"matrix": name, "update_norm": row.get("dW"), "jump": value / median})
        return sorted(jumped, key=lambda item: -item["jump"])

    def _log_tensorboard(self, step: int, out: dict[str, Any]) -> None:
        if self.writer is None:
            return
        dynamics = out.get("dynamics")
        if dynamics:
            for key in ("max_update_norm", "max_update_ratio", "median_update_ratio", "max_factor_update_norm"):
                if dynamics.get(key) is not None:
                    self.writer.add_scalar(f"dynamics/{key}", dynamics[key], step)
            for group, stats in dynamics["groups"].items():
                if stats["grad_norm"] is not None:
                    self.writer.add_scalar(f"dynamics/grad_norm/{group}", stats["grad_norm"], step)
            for name, row in dynamics["matrices"].items():
                for key in ("dW", "W", "ratio"):
                    if row.get(key) is not None:
                        self.writer.add_scalar(f"dynamics/{key}/{name}", row[key], step)
        if "spike" in out:
            self.writer.add_scalar("dynamics/spike_ratio", out["spike"]["ratio"], step)
