"""Stage `similarity` (METRICS.md §4): how close a run's hidden states are to a reference run's
at the same step, on the probe set, per layer (0 = embedding output, i = block i): L2, relative
L2, cosine and linear CKA, and each side's mean activation norm, accumulated batch by batch
(never an N × N matrix).

The layers are those of HF ``hidden_states``, which the study compares
(low-rank-geometry, loss-landscape/scripts/single_checkpoint_scripts/6_activations_comparison.py):
the last one is the output of the final RMSNorm (``last_hidden=final_norm``, the default);
``last_hidden=block_output`` takes the raw output of the last block instead (ours).

:func:`similarity_rows` compares any two models of one shape; the stage compares each run with
the study's reference (the full-rank run of the same scale and seed) and with every baseline
reference (the full-rank runs of the other seeds), one item per reference and checkpoint. Each
row names its reference, the reference's method and seed, and the ``pairing`` (self | same-seed |
cross-seed); a full-rank run's cross-seed rows are the full-rank seed baseline. Rows go to
similarity.csv.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rankscope.analysis.context import RunInfo, pairing
from rankscope.analysis.probe import Probe
from rankscope.analysis.settings import settings_hash
from rankscope.analysis.similarity import SimilarityAccumulator
from rankscope.analysis.stages.base import Stage
from rankscope.analysis.store import KEY_COLUMNS, Item, TableSpec
from rankscope.errors import AnalysisError

SIMILARITY_METRICS = ("l2", "relative_l2", "cosine", "cka", "mean_norm", "reference_mean_norm")
LAST_HIDDEN = ("final_norm", "block_output")


def hidden_states(model: nn.Module, batch: torch.Tensor, last_hidden: str = "final_norm") -> list[torch.Tensor]:
    """The embedding output and each block's output; with ``final_norm`` the last one passes
    through the model's final RMSNorm, as HF's ``output_hidden_states`` returns it."""
    if last_hidden not in LAST_HIDDEN:
        raise AnalysisError(f"unknown last_hidden {last_hidden!r}; use final_norm or block_output")
    _, hidden = model(batch, output_hidden_states=True)
    if last_hidden == "final_norm":
        hidden = [*hidden[:-1], model.norm(hidden[-1])]
    return hidden


@torch.no_grad()
def similarity_rows(
    model: nn.Module, reference_model: nn.Module, probe: Probe, last_hidden: str = "final_norm"
) -> list[dict[str, Any]]:
    """similarity.csv rows (without the keys and reference_run): per layer (0 = embedding output,
    i = block i) L2, relative L2, cosine, linear CKA and both mean norms of the model's hidden
    states against the reference's, accumulated batch by batch over the probe set. Any two
    models of one shape can be compared (a seed baseline is two full-rank runs)."""
    accumulators: list[SimilarityAccumulator] | None = None
    for batch in probe.batches:
        hidden = hidden_states(model, batch, last_hidden)
        reference_hidden = hidden_states(reference_model, batch, last_hidden)
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
    table = TableSpec("similarity", KEY_COLUMNS + [
        "reference_run", "reference_method", "reference_seed", "pairing", "layer", "metric", "value", "applicable", "reason",
    ])

    def plan(self, step: int, steps: Sequence[int]) -> list[Item]:
        items = []
        for reference in self.context.references(self.run):
            payload = {
                "settings": self.settings.family_settings("similarity"), "probe": self.probe.fingerprint,
                "reference": str(reference.path.resolve()),
            }
            items.append(Item(step, f"similarity:{reference.name}", settings_hash(payload), {"reference": reference}))
        return items

    def compute(self, item: Item) -> dict[str, Any]:
        reference: RunInfo = item.context["reference"]
        self.progress.advance(1.0)
        head = {"reference_run": reference.name, "reference_method": reference.method, "reference_seed": reference.seed,
                "pairing": pairing(self.run, reference)}
        num_layers = int(self.run.model_config.get("num_layers", 0))
        if item.step not in reference.steps:
            reason = f"reference {reference.name} has no checkpoint at step {item.step} (it has {reference.steps})"
            return {"rows": [{**head, **row} for row in similarity_not_applicable(num_layers, reason)], "arrays": {}}
        loaded = self.context.models.get(self.run, item.step)
        reference_loaded = self.context.models.get(reference, item.step)
        rows = similarity_rows(loaded.model, reference_loaded.model, self.probe, self.settings.last_hidden)
        return {"rows": [{**head, **row} for row in rows], "arrays": {}}
