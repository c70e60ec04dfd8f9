"""The stages of `rankscope analyze`, one per metric family, in the order they run and their
tables appear. Each module holds a family's whole path: plan items, compute rows, its table."""

from __future__ import annotations

from rankscope.analysis.stages.base import Stage
from rankscope.analysis.stages.hessian import HessianStage
from rankscope.analysis.stages.interpolation import InterpolationStage
from rankscope.analysis.stages.intruder import IntruderStage
from rankscope.analysis.stages.landscape import LandscapeStage
from rankscope.analysis.stages.landscape2d import Landscape2DStage
from rankscope.analysis.stages.similarity import SimilarityStage
from rankscope.analysis.stages.spectral import SpectralStage

STAGES: tuple[type[Stage], ...] = (
    LandscapeStage, InterpolationStage, SpectralStage, SimilarityStage, IntruderStage, Landscape2DStage, HessianStage,
)
TABLE_COLUMNS: dict[str, list[str]] = {stage.table.name: stage.table.columns for stage in STAGES}

__all__ = [
    "STAGES", "TABLE_COLUMNS", "HessianStage", "InterpolationStage", "IntruderStage", "Landscape2DStage", "LandscapeStage", "SimilarityStage",
    "SpectralStage", "Stage",
]
