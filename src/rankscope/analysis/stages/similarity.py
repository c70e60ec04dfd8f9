"""Stage `similarity` (METRICS.md §4): how close a run's hidden states are to a reference run's
at the same step, on the probe set, per layer (0 = embedding output, i = block i): L2, relative
L2, cosine and linear CKA, accumulated batch by batch (never an N × N matrix).

:func:`similarity_rows` compares any two models of one shape; the stage compares each run with
the study's reference (the full-rank run of the same scale and seed). Rows go to similarity.csv.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rankscope.analysis import AnalysisError
from rankscope.analysis.probe import Probe
from rankscope.analysis.settings import settings_hash
from rankscope.analysis.similarity import SimilarityAccumulator
from rankscope.analysis.stages.base import Stage
from rankscope.analysis.store import KEY_COLUMNS, Item, TableSpec

SIMILARITY_METRICS = ("l2", "relative_l2", "cosine", "cka")


@torch.no_grad()
def similarity_rows(model: nn.Module, reference_model: nn.Module, probe: Probe) -> list[dict[str, Any]]:
    """similarity.csv rows (without the keys and reference_run): per layer (0 = embedding output,
    i = block i) L2, relative L2, cosine and linear CKA of the model's hidden states against the
    reference's, accumulated batch by batch over the probe set."""
    accumulators: list[SimilarityAccumulator] | None = None
    for batch in probe.batches:
        _, hidden = model(batch, output_hidden_states=True)
        _, reference_hidden = reference_model(batch, output_hidden_states=True)
        if len(hidden) != len(reference_hidden):
            raise AnalysisError(f"the model has {len(hidden) - 1} blocks but the reference has {len(reference_hidden) - 1}")
        if accumulators is None:
            accumulators = [SimilarityAccumulator() for _ in hidden]
        mask = probe.padding_mask(batch)
        for acc, x, y in zip(accumulators, reference_hidden, hidden):
            acc.update(x.float(), y.float(), mask)
    rows = []
    for layer, acc in enumerate(accumulators or []):
        result = acc.result()
        for metric in SIMILARITY_METRICS:
            rows.append({"layer": layer, "metric": metric, "value": float(result[metric]), "applicable": True, "reason": ""})
    return rows


def similarity_not_applicable(num_layers: int, reason: str) -> list[dict[str, Any]]:
    return [
        {"layer": layer, "metric": metric, "value": float("nan"), "applicable": False, "reason": reason}
        for layer in range(num_layers + 1)
        for metric in SIMILARITY_METRICS
    ]


class SimilarityStage(Stage):
    table = TableSpec("similarity", KEY_COLUMNS + ["reference_run", "layer", "metric", "value", "applicable", "reason"])

    def plan(self, step: int, steps: Sequence[int]) -> list[Item]:
        payload = {
            "settings": self.settings.family_settings("similarity"), "probe": self.probe.fingerprint,
            "reference": str(self.context.reference.path.resolve()),
        }
        return [Item(step, "similarity", settings_hash(payload))]

    def compute(self, item: Item) -> dict[str, Any]:
        reference = self.context.reference
        self.progress.advance(1.0)
        head = {"reference_run": reference.name}
        num_layers = int(self.run.model_config.get("num_layers", 0))
        if item.step not in reference.steps:
            reason = f"reference {reference.name} has no checkpoint at step {item.step} (it has {reference.steps})"
            return {"rows": [{**head, **row} for row in similarity_not_applicable(num_layers, reason)], "arrays": {}}
        loaded = self.context.models.get(self.run, item.step)
        reference_loaded = self.context.models.get(reference, item.step)
        rows = similarity_rows(loaded.model, reference_loaded.model, self.probe)
        return {"rows": [{**head, **row} for row in rows], "arrays": {}}
