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

Spectral norms come from block power iteration on implicit operators, never a dense SVD
(`rankscope.train.update_spectra`): a factored layer is applied through its factors, a dense one
through its dense update, and matrices of one shape are iterated as one batch. The iteration is
warm-started from the previous measurement and draws its random starts from a private generator,
so measuring never changes training: a run with dynamics on is bit-identical to one with it off.
The measured update is the optimizer step's, against a copy of the targeted tensors taken just
before it; a method's periodic after_step work (a ReLoRA merge, which leaves W unchanged, or a LORO
exact step) runs after the step is logged and is not part of it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from typing import Any

import torch
from torch import nn

from rankscope.train.update_spectra import (
    as_operator,
    batched_norms,
    current,
    difference_operator,
    factor_names,
    snapshot,
    update_operator,
    weight_operator,
)

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
    exist (before clipping), `after_update` after the optimizer step.
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
        started = time.perf_counter()
        self._pending = {
            "trigger": "period" if periodic else "spike", "spike": spike,
            "groups": self._group_stats(),
            "before": {name: snapshot(module) for name, module in self.matrices},
        }
        self._pending["seconds"] = time.perf_counter() - started

    def after_update(self, step: int, applied: bool = True) -> dict[str, Any]:
        pending, self._pending = self._pending, None
        if pending is None:
            return {}
        out: dict[str, Any] = {}
        if applied:
            started = time.perf_counter()
            dynamics = self._measure(pending["before"], pending["groups"])
            dynamics["trigger"] = pending["trigger"]
            dynamics["seconds"] = pending["seconds"] + time.perf_counter() - started
            out["dynamics"] = dynamics
        if pending["spike"] is not None:
            out["spike"] = {**pending["spike"], "matrices": self._jumped(out.get("dynamics"))}
        elif applied:  # the baseline of update norms holds periodic, spike-free steps only
            self._remember(out["dynamics"])
        self._log_tensorboard(step, out)
        return out

    # -- measurement -----------------------------------------------------------------------
    def _group_stats(self) -> dict[str, dict[str, float | None]]:
        stats = {}
        for index, group in enumerate(self.optimizer.param_groups):
            grads = [p.grad for p in group["params"] if p.grad is not None]
            # dtype= widens inside the reduction: no fp32 copy of a bf16 gradient (the embedding's is large).
            norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
            norm = float(torch.linalg.vector_norm(torch.stack(norms))) if grads else 0.0
            stats[str(group.get("name", f"group{index}"))] = {"grad_norm": _finite_or_none(norm), "lr": float(group["lr"])}
        return stats

    @torch.no_grad()
    def _measure(self, before: dict[str, dict[str, torch.Tensor]], groups: dict[str, Any]) -> dict[str, Any]:
        items: dict[str, list] = {}  # label (dW, W, B, dB, ...) -> [(matrix, operator)]
        for name, module in self.matrices:
            old, new = before[name], current(module)
            for label, op in (("dW", update_operator(module, old, new)), ("W", weight_operator(module, new))):
                if op is not None:
                    items.setdefault(label, []).append((name, op))
            for label, tensor in factor_names(module).items():
                items.setdefault(label, []).append((name, as_operator(new[tensor])))
                items.setdefault(f"d{label}", []).append((name, difference_operator(new[tensor], old[tensor])))
        norms = {label: batched_norms(ops, self.iters, self.vectors, self.generator, label) for label, ops in items.items()}
        matrices: dict[str, dict[str, float | None]] = {}
        for name, _ in self.matrices:
            row = {label: values[name] for label, values in norms.items() if name in values}
            row.setdefault("dW", None)
            row.setdefault("W", None)
            if row["dW"] is not None and row["W"]:
                row["ratio"] = row["dW"] / row["W"]
            matrices[name] = row
        updates = {n: r["dW"] for n, r in matrices.items() if r["dW"] is not None}
        ratios = [r["ratio"] for r in matrices.values() if r.get("ratio") is not None]
        factor_updates = [v for r in matrices.values() for k, v in r.items() if k in ("dA", "dB") and v is not None]
        worst = max(updates, key=updates.get) if updates else None
        return {
            "max_update_norm": updates[worst] if worst else None, "max_update_matrix": worst,
            # the lr of that matrix's group: Spectron bounds ‖ΔW‖₂ by it
            "max_update_lr": self._lr_of(worst),
            "max_update_ratio": max(ratios) if ratios else None,
            "median_update_ratio": statistics.median(ratios) if ratios else None,
            "max_factor_update_norm": max(factor_updates) if factor_updates else None,
            "groups": groups, "matrices": matrices,
        }

    def _lr_of(self, name: str | None) -> float | None:
        index = self.group_index.get(name) if name else None
        return None if index is None else float(self.optimizer.param_groups[index]["lr"])

    def _per_lr(self, name: str, row: dict[str, Any]) -> float | None:
        """A matrix's update norm divided by its group's lr (Adam-like steps scale with lr, so
        warm-up and decay do not read as jumps); for CoLA the larger factor update."""
        value = row.get("dW")
        if value is None:
            value = max((row[k] for k in ("dA", "dB") if row.get(k) is not None), default=None)
        lr = self._lr_of(name)
        return value / lr if value is not None and lr else None

    def _remember(self, dynamics: dict[str, Any]) -> None:
        for name, row in dynamics["matrices"].items():
            value = self._per_lr(name, row)
            if value is not None:
                self.update_history[name].append(value)

    def _jumped(self, dynamics: dict[str, Any] | None) -> list[dict[str, Any]]:
        """Matrices whose update norm per unit lr exceeds spike_factor × their median so far,
        largest jump first."""
        if dynamics is None:
            return []
        jumped = []
        for name, row in dynamics["matrices"].items():
            value = self._per_lr(name, row)
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
