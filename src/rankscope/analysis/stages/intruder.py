"""Stage `intruder` (docs/metrics.md, "Intruder dimensions"): intruder dimensions of every block matrix against full rank,
against the full-rank seed baseline and against the run's own initialisation.

Definition (Shuttleworth et al., arXiv 2410.21228; reeceshuttle/intruder-dimensions @43d1693,
find_intruder_dimensions.py `find_number_of_intruder_dimensions`): for a matrix W and a
reference W_ref of one shape, take the left singular vectors of both (all min(m, n) of them);
for each of W's top-k vectors u_j (by singular value) its similarity to the reference is
s_j = max_i |⟨u_j, u_ref,i⟩|, and u_j is an intruder when s_j < ε. The official defaults are
k = 10 and ε = 0.5; the count is summed over the matrices. Right singular vectors are not used
(`intruder_side: right` takes them instead, ours).

Here W is each targeted layer's effective dense weight (W, B·A, W₀ + s·B·A, s·B·A + S, as
`space.dense_weight` gives it; CoLA has none and gets rows marked not applicable), the SVDs run
in fp64 (official: fp32), and a matrix whose top-k singular values are closer than 1e-6·σ₁ is
flagged (`degenerate` = 1): its singular vectors are defined only up to a rotation, which the
max over the reference basis tolerates only in part.

References, one item each (the ``pairing`` column): the full-rank run of the same seed
(``same-seed``), the full-rank runs of the other seeds (``cross-seed``; a full-rank run's own
cross-seed rows are the seed baseline: how many intruders another full-rank seed already has) and
the run's initialisation (``init``, rebuilt from its seed as the trainer built it). A random
initialisation has no learned directions: against a random orthonormal basis of R^m the expected
max |cos| is about sqrt(2 ln m / m), so most top-k vectors are intruders against the init; read
it next to full rank's own count against its init.

Rows per matrix: ``intruders`` (count at ε), ``similarity_1`` … ``similarity_k`` and
``degenerate``; per reference: ``intruders`` summed over matrices (``matrix = total``, the
official aggregate) and averaged (``matrix = mean``). Rows go to intruder.csv.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rankscope.analysis.context import RunInfo, pairing
from rankscope.analysis.settings import settings_hash
from rankscope.analysis.space import dense_weight, target_modules
from rankscope.analysis.stages.base import Stage
from rankscope.analysis.store import KEY_COLUMNS, Item, TableSpec

DEGENERATE_GAP = 1e-6  # relative to σ₁
INIT = "init"


def singular_vectors(matrices: torch.Tensor, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors as columns, singular values) of a matrix or a stack, in fp64: U (left) or V (right)."""
    u, s, vh = torch.linalg.svd(matrices.to(torch.float64), full_matrices=False)
    return (u if side == "left" else vh.mT), s


def intruder_scores(W: torch.Tensor, reference: torch.Tensor, k: int = 10,
                    side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(s_j = max_i |⟨u_j, u_ref,i⟩| for W's top-k singular vectors u_j, W's singular values),
    for a matrix or a stack of them."""
    vectors, values = singular_vectors(W, side)
    reference_vectors, _ = singular_vectors(reference.to(W.device), side)
    top = vectors[..., : min(k, vectors.shape[-1])]
    return (top.mT @ reference_vectors).abs().amax(dim=-1), values


def count_intruders(similarities: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """How many of the similarities fall below ε (the official strict `<`)."""
    return (similarities < threshold).sum(dim=-1)


def is_degenerate(singular_values: torch.Tensor, k: int) -> torch.Tensor:
    """Whether two of the top-k singular values (or the k-th and the next) lie within 1e-6·σ₁."""
    kept = singular_values[..., : k + 1]
    gaps = kept[..., :-1] - kept[..., 1:]
    return (gaps < DEGENERATE_GAP * singular_values[..., :1]).any(dim=-1)


def dense_targets(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """{matrix name: effective dense weight} and {matrix name: layer} of the targeted layers that have one."""
    weights, layers = {}, {}
    for target in target_modules(model):
        weight = dense_weight(target.module)
        if weight is not None:
            weights[target.name], layers[target.name] = weight, target.layer
    return weights, layers


def intruder_rows(weights: Mapping[str, torch.Tensor], references: Mapping[str, torch.Tensor],
                  layers: Mapping[str, int], k: int = 10, threshold: float = 0.5, side: str = "left") -> list[dict[str, Any]]:
    """intruder.csv rows (without keys and reference columns) for matrices matched by name;
    SVDs batched by shape."""
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, W in weights.items():
        if name in references:
            by_shape.setdefault(tuple(W.shape), []).append(name)
    rows: list[dict[str, Any]] = []
    counts: dict[str, float] = {}
    for names in by_shape.values():
        similarities, values = intruder_scores(torch.stack([weights[n] for n in names]),
                                               torch.stack([references[n] for n in names]), k, side)
        found = count_intruders(similarities, threshold)
        degenerate = is_degenerate(values, k)
        for index, name in enumerate(names):
            counts[name] = float(found[index])
            rows.append(_row(name, layers[name], "intruders", counts[name]))
            rows += [_row(name, layers[name], f"similarity_{j + 1}", float(v)) for j, v in enumerate(similarities[index])]
            rows.append(_row(name, layers[name], "degenerate", float(degenerate[index])))
    if counts:
        rows.append(_row("total", -1, "intruders", float(sum(counts.values()))))
        rows.append(_row("mean", -1, "intruders", float(sum(counts.values()) / len(counts))))
    rows.sort(key=lambda r: (r["layer"] < 0, r["layer"]))
    return rows


def _row(matrix: str, layer: int, metric: str, value: float) -> dict[str, Any]:
    return {"matrix": matrix, "layer": layer, "metric": metric, "value": value, "applicable": True, "reason": ""}


def intruder_not_applicable(reason: str) -> list[dict[str, Any]]:
    return [{**_row(matrix, -1, "intruders", math.nan), "applicable": False, "reason": reason} for matrix in ("total", "mean")]


class IntruderStage(Stage):
    table = TableSpec("intruder", KEY_COLUMNS + [
        "reference_run", "reference_method", "reference_seed", "pairing", "matrix", "layer", "metric", "value",
        "applicable", "reason",
    ])

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_weights: dict[str, torch.Tensor] | None = None

    def plan(self, step: int, steps: Sequence[int]) -> list[Item]:
        settings = self.settings.family_settings("intruder")
        items = []
        for reference in self.context.references(self.run):
            payload = {"settings": settings, "reference": str(reference.path.resolve())}
            items.append(Item(step, f"intruder:{reference.name}", settings_hash(payload), {"reference": reference}))
        items.append(Item(step, f"intruder:{INIT}", settings_hash({"settings": settings, "reference": INIT}), {"reference": None}))
        return items

    def compute(self, item: Item) -> dict[str, Any]:
        reference: RunInfo | None = item.context["reference"]
        self.progress.advance(1.0)
        if reference is None:
            head = {"reference_run": INIT, "reference_method": self.run.method, "reference_seed": self.run.seed,
                    "pairing": INIT}
        else:
            head = {"reference_run": reference.name, "reference_method": reference.method,
                    "reference_seed": reference.seed, "pairing": pairing(self.run, reference)}
        weights, layers = dense_targets(self.context.models.get(self.run, item.step).model)
        if not weights:
            reason = f"{self.run.method} has no dense weight (B·σ(A·x) is nonlinear)"
            return {"rows": [{**head, **row} for row in intruder_not_applicable(reason)], "arrays": {}}
        if reference is None:
            references = self.initial_weights()
        elif item.step not in reference.steps:
            reason = f"reference {reference.name} has no checkpoint at step {item.step} (it has {reference.steps})"
            return {"rows": [{**head, **row} for row in intruder_not_applicable(reason)], "arrays": {}}
        else:
            references, _ = dense_targets(self.context.models.get(reference, item.step).model)
        s = self.settings
        rows = intruder_rows(weights, references, layers, s.intruder_k, s.intruder_threshold, s.intruder_side)
        return {"rows": [{**head, **row} for row in rows], "arrays": {}}

    def initial_weights(self) -> dict[str, torch.Tensor]:
        """The run's dense weights at step 0, rebuilt from its config and seed as the trainer builds them."""
        if self._init_weights is None:
            from rankscope.models import LlamaConfig
            from rankscope.train.setup import build_run_model

            with torch.random.fork_rng(devices=[]):
                model, _ = build_run_model(self.run.config, LlamaConfig(**self.run.model_config))
            self._init_weights, _ = dense_targets(model)
        return self._init_weights
