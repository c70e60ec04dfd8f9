"""The shape every stage of `rankscope analyze` has: plan its items for a checkpoint, compute one,
and say which table its rows fill (METRICS.md, one family per stage)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import nn

from rankscope.analysis.context import AnalysisContext, RunInfo
from rankscope.analysis.item_progress import Progress
from rankscope.analysis.space import build_dense_model
from rankscope.analysis.store import Item, TableSpec


class Stage(abc.ABC):
    """One metric family for one run. Instances live for one run's analysis and may cache what
    consecutive items share (a loaded parameter space, a run's trajectory directions)."""

    table: ClassVar[TableSpec]

    def __init__(self, run: RunInfo, context: AnalysisContext, progress: Progress | None = None) -> None:
        self.run, self.context = run, context
        self.settings = context.settings
        self.probe = context.probe
        self.progress = progress or Progress(run.name, 0.0, enabled=False)

    @abc.abstractmethod
    def plan(self, step: int, steps: Sequence[int]) -> list[Item]:
        """The items of this family at ``step`` (``steps``: every step planned in this call)."""

    @abc.abstractmethod
    def compute(self, item: Item) -> dict[str, Any]:
        """``{"rows": [...], "arrays": {...}}`` and optional ``not_applicable``, ``notes``, ``base_loss``."""

    def model_in_space(self, step: int) -> tuple[nn.Module, str]:
        """The run's model at ``step`` in the space a perturbation acts on (``settings.space``):
        its native parameters, or a plain model of its merged dense weights where it has them;
        and a note saying which it is."""
        models = self.context.models
        loaded = models.get(self.run, step)
        if self.settings.space != "dense":
            return loaded.model, "native"
        dense = models.dense(self.run, step)
        if isinstance(dense, str):
            return loaded.model, f"native ({dense})"
        return build_dense_model(loaded.model_config, dense, self.probe.device), "dense"

    def at_last_step_only(self, every_checkpoint: bool, step: int, steps: Sequence[int]) -> bool:
        """Whether an expensive family skips ``step`` (it runs at the last planned step only)."""
        return not every_checkpoint and step != max(steps)

    @classmethod
    def describe(cls, run: RunInfo, context: AnalysisContext) -> dict[str, Any]:
        """Entries this family adds to meta.json (grids, direction counts, partners)."""
        return {}
