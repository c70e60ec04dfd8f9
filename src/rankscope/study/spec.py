"""A study file: the grid of methods x presets x seeds and the settings of every stage.

`load_study` reads the YAML into typed dataclasses; `plan_runs` resolves and validates the run
config of every cell of the grid before anything is trained.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankscope import methods
from rankscope.config import RunConfig, build_config, dataclass_from_dict, load_yaml
from rankscope.errors import ConfigError, RankscopeError, did_you_mean
from rankscope.train.setup import check_method_settings

STAGES = ("train", "analyze", "eval", "predict", "report")
REFERENCE_METHOD = "full"


@dataclass
class GridSpec:
    methods: list[str] = field(default_factory=lambda: [REFERENCE_METHOD])
    presets: list[str] = field(default_factory=lambda: ["tiny"])
    seeds: list[int] = field(default_factory=lambda: [0])


@dataclass
class EvalSpec:
    tasks: list[str] = field(default_factory=lambda: ["rankscope_local"])
    limit: int = 0  # items per task; 0 = all
    batch_size: int = 16
    device: str = "auto"


@dataclass
class PredictorSpec:
    features: list[str] = field(default_factory=list)  # empty = the 8 geometry features
    alpha: float = 1.0
    missing: str = "common"  # rows with a missing feature: dropped from every set (common) or imputed (impute)


@dataclass
class StudySpec:
    name: str = "study"
    grid: GridSpec = field(default_factory=GridSpec)
    base: dict[str, Any] = field(default_factory=dict)  # a run config applied to every run
    method_overrides: dict[str, Any] = field(default_factory=dict)  # method -> run config mapping
    preset_overrides: dict[str, Any] = field(default_factory=dict)  # preset -> run config mapping
    # method -> preset -> run config mapping, for what an official harness fixes per scale
    method_preset_overrides: dict[str, Any] = field(default_factory=dict)
    analysis: dict[str, Any] = field(default_factory=dict)  # AnalysisSettings fields
    eval: EvalSpec = field(default_factory=EvalSpec)
    predictor: PredictorSpec = field(default_factory=PredictorSpec)


@dataclass(frozen=True)
class PlannedRun:
    name: str
    method: str
    preset: str
    seed: int
    config: RunConfig


def run_name(method: str, preset: str, seed: int) -> str:
    return f"{method}-{preset}-s{seed}"


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_study(path: str | Path) -> StudySpec:
    data = load_yaml(path)
    return study_from_dict(data)


def study_from_dict(data: dict) -> StudySpec:
    return dataclass_from_dict(StudySpec, data, "study")


def plan_runs(spec: StudySpec) -> list[PlannedRun]:
    """Resolve and validate every run config of the grid before anything is trained."""
    grid = spec.grid
    if not grid.methods or not grid.presets or not grid.seeds:
        raise ConfigError(
            f"study grid is empty (methods {grid.methods}, presets {grid.presets}, seeds {grid.seeds}); "
            "list at least one of each under grid:"
        )
    known = methods.names()
    for name in grid.methods:
        if name not in known:
            raise ConfigError(f"study grid names unknown method {name!r}{did_you_mean(name, known)}")
    for name in spec.method_overrides:
        if name not in grid.methods:
            raise ConfigError(f"method_overrides names {name!r}, which is not in grid.methods {grid.methods}")
    for name, per_preset in spec.method_preset_overrides.items():
        # Entries for methods outside the grid are allowed: a study file may be run narrowed.
        if name not in known or not isinstance(per_preset, dict):
            raise ConfigError(f"method_preset_overrides names {name!r}{did_you_mean(name, known)}: use a registered "
                              "method mapping presets to run config mappings")
    if REFERENCE_METHOD not in grid.methods:
        raise ConfigError(
            f"the study has no full-rank reference: add {REFERENCE_METHOD!r} to grid.methods "
            "(analysis compares every run with the full-rank run of the same preset and seed)"
        )
    if len(set(grid.seeds)) != len(grid.seeds) or len(set(grid.methods)) != len(grid.methods):
        raise ConfigError("study grid lists a method or seed twice")
    _check_run_trees(spec)
    planned = []
    for preset in grid.presets:
        for seed in grid.seeds:
            for method in grid.methods:
                tree = _merge(spec.base, spec.preset_overrides.get(preset, {}))
                tree = _merge(tree, spec.method_overrides.get(method, {}))
                tree = _merge(tree, spec.method_preset_overrides.get(method, {}).get(preset, {}))
                tree = _merge(tree, {"model": {"preset": preset}, "train": {"seed": seed}})
                tree["method"] = _merge(tree.get("method", {}) or {}, {"name": method})
                name = run_name(method, preset, seed)
                try:
                    cfg = build_config(tree)
                    check_method_settings(cfg)
                except RankscopeError as exc:
                    raise type(exc)(f"study run {name}: {exc}") from None
                planned.append(PlannedRun(name, method, preset, seed, cfg))
    return planned


RUN_SECTIONS = ("model", "data", "method", "optim", "train")


def _check_run_tree(tree: Any, where: str) -> None:
    """A run-config mapping of the study file: each section it names must itself be a mapping."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{where} must be a mapping of run config sections ({', '.join(RUN_SECTIONS)}), got {tree!r}")
    for key, value in tree.items():
        if key in RUN_SECTIONS and value is not None and not isinstance(value, dict):
            hint = ("; the grid names the methods, so write the method's settings as a mapping, "
                    "e.g. method: {rank: 64}") if key == "method" else ""
            raise ConfigError(f"{where}.{key} must be a mapping, got {value!r}{hint}")


def _check_run_trees(spec: StudySpec) -> None:
    _check_run_tree(spec.base, "base")
    for kind in ("preset_overrides", "method_overrides"):
        for key, tree in getattr(spec, kind).items():
            _check_run_tree(tree, f"{kind}.{key}")
    for method, per_preset in spec.method_preset_overrides.items():
        for preset, tree in per_preset.items():
            _check_run_tree(tree, f"method_preset_overrides.{method}.{preset}")


def analysis_settings(spec: StudySpec):
    return settings_from_mapping(spec.analysis)


def settings_from_mapping(mapping: dict[str, Any]):
    """AnalysisSettings from the study file's `analysis:` mapping, validated."""
    from rankscope.analysis.settings import AnalysisSettings

    settings = dataclass_from_dict(AnalysisSettings, dict(mapping), "analysis")
    settings.__post_init__()
    settings.validate()
    return settings

