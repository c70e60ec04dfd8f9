"""The public face of the analysis pipeline: `analyze_runs` and the per-family functions that work
on loaded models without the run/checkpoint machinery.

The code lives where it is measured: :mod:`.run` orders the stages, :mod:`.stages` holds one
module per metric family, :mod:`.probe`, :mod:`.space`, :mod:`.runs` and :mod:`.store` what
they share. This module only gathers the names callers use.
"""

from __future__ import annotations

from rankscope.analysis.context import RunInfo, inspect_run
from rankscope.analysis.cost import measure_point_cost
from rankscope.analysis.probe import Probe, probe_fingerprint
from rankscope.analysis.run import analyze_runs, plan_items
from rankscope.analysis.space import (
    ParameterSpace,
    build_dense_model,
    dense_weight,
    scope_parameter_names,
    target_modules,
)
from rankscope.analysis.stages import TABLE_COLUMNS
from rankscope.analysis.stages.interpolation import ccbh_curve, imbh_curve, interpolation_curve
from rankscope.analysis.stages.landscape import (
    LANDSCAPE_METRICS,
    LandscapeProfiles,
    evaluate_profiles,
    landscape_family,
    landscape_summary_rows,
    random_direction_set,
    singular_direction_set,
    trajectory_directions,
)
from rankscope.analysis.stages.similarity import SIMILARITY_METRICS, similarity_rows
from rankscope.analysis.stages.spectral import spectral_matrices, spectral_rows
from rankscope.analysis.store import KEY_COLUMNS

__all__ = [
    "KEY_COLUMNS", "LANDSCAPE_METRICS", "LandscapeProfiles", "ParameterSpace", "Probe", "RunInfo", "SIMILARITY_METRICS",
    "TABLE_COLUMNS", "analyze_runs", "build_dense_model", "ccbh_curve", "dense_weight", "evaluate_profiles", "imbh_curve",
    "inspect_run", "interpolation_curve", "landscape_family", "landscape_summary_rows", "measure_point_cost", "plan_items",
    "probe_fingerprint", "random_direction_set", "scope_parameter_names", "similarity_rows", "singular_direction_set",
    "spectral_matrices", "spectral_rows", "target_modules", "trajectory_directions",
]
