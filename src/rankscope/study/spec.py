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
from rankscope.config import (
    REFERENCE_METHOD,
    RunConfig,
    build_config,
    dataclass_from_dict,
    load_yaml,
    merge_trees,
    parse_override,
)
from rankscope.errors import ConfigError, RankscopeError, did_you_mean
from rankscope.train.setup import check_method_settings

# prepare (tokenization, in the driver) also runs before any job stage whether named or not.
STAGES = ("prepare", "tune", "train", "analyze", "eval", "predict", "report")
TUNE_PROTOCOLS = ("shared-dense", "independent")
# The keys stage 1 of the shared-dense protocol tunes as one value with full rank's block lr, and
# stage 2 then fixes for every method and control: the lrs of what no method changes.
DENSE_KEYS = ("optim.embed_lr", "optim.head_lr", "optim.norm_lr")


@dataclass
class GridSpec:
    # Method names, or `all`: every registered method that is not a control (study_from_dict expands it).
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
class ParamGrid:
    """The values one hyper-parameter (a dotted run-config key) takes in the tuning grid."""

    values: list[float] = field(default_factory=list)  # absolute values
    multipliers: list[float] = field(default_factory=list)  # x the method's default at the preset
    # Which default the multipliers multiply: "default" (what a run uses: the value tuned here for
    # tiny and 20m, the literature's above) or "literature" (the method's official harness value,
    # so that a tuning study gives the same grid after its results were shipped as defaults).
    around: str = "default"
    # How a best value on the edge extends the grid: "log" multiplies by the ratio of the two
    # outermost values on that side, "linear" adds their difference.
    scale: str = "log"
    min: float | None = None  # the extension never goes below / above these
    max: float | None = None


@dataclass
class RefineSpec:
    """More seeds for the best points of the grid, once its edges are settled."""

    seeds: list[int] = field(default_factory=list)
    top: int = 3  # how many of the best points (by the mean over the grid's seeds) get them


@dataclass
class TuneSpec:
    """The `tune:` block: a grid per hyper-parameter, searched per (method, preset) before training."""

    params: dict[str, Any] = field(default_factory=dict)  # dotted key -> ParamGrid mapping; empty: no tuning
    method_params: dict[str, Any] = field(default_factory=dict)  # method -> {key: ParamGrid mapping or null}
    methods: list[str] = field(default_factory=list)  # default: grid.methods
    presets: list[str] = field(default_factory=list)  # default: grid.presets
    steps: int | None = None  # default: each run's train.steps
    seeds: list[int] = field(default_factory=lambda: [0])
    metric: str = "val_loss"  # val_loss (final) | best_val_loss | train_loss (mean of the last 10% logged)
    max_extensions: int = 2  # per parameter and direction
    refine: RefineSpec = field(default_factory=RefineSpec)
    run: dict[str, Any] = field(default_factory=dict)  # run config mapping for tuning runs only
    keep_checkpoints: bool = False  # tuning runs are not analysed: their checkpoints go once scored
    # "shared-dense" (default): stage 1 tunes full rank's own keys jointly with one lr for the
    # embeddings, head and norms (`dense`, written to every key of `dense_keys`); stage 2 fixes
    # that dense lr for every method and control and tunes only each method's own keys, so the
    # methods differ only in what they do to the block matrices. "independent": every method
    # tunes its own keys with the dense parameters at its own lr, as the official harnesses run.
    protocol: str = "shared-dense"
    dense: dict[str, Any] = field(default_factory=lambda: {"values": [0.002, 0.006, 0.02]})
    dense_keys: list[str] = field(default_factory=lambda: list(DENSE_KEYS))


# The verdicts on a regime (report/informativeness.py; the tune stage's own, tune/chosen.json).
CAN_SEPARATE, CANNOT_SEPARATE, NOT_CHECKED = "can separate", "cannot separate", "not checked"


@dataclass
class ReportSpec:
    """Settings of the report stage."""

    # The frozen-blocks control within this many nats of the best method's val loss: the regime
    # cannot tell apart methods that differ only in the block matrices, and the report says so.
    informative_margin: float = 0.2


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
    tune: TuneSpec = field(default_factory=TuneSpec)
    # Reference rows trained next to the methods (each a registered control, e.g. `frozen`); the
    # report shows them and never ranks them. [] trains none.
    controls: list[str] = field(default_factory=lambda: ["frozen"])
    report: ReportSpec = field(default_factory=ReportSpec)


def study_members(spec: StudySpec) -> list[str]:
    """Every method and control a study trains: grid.methods, then the controls."""
    return list(spec.grid.methods) + [c for c in spec.controls if c not in spec.grid.methods]


# Where a run's lr comes from (regime.json, the report's regime statement).


@dataclass(frozen=True)
class PlannedRun:
    name: str
    method: str
    preset: str
    seed: int
    config: RunConfig
    # The tune stage's values this run uses ({dotted key: value}); keys the run sets itself are not here.
    tuned: dict = field(default_factory=dict)
    lr_source: str = "literature"  # run | tuned in this study | tuned here | literature


def run_name(method: str, preset: str, seed: int) -> str:
    return f"{method}-{preset}-s{seed}"


def load_study(path: str | Path) -> StudySpec:
    data = load_yaml(path)
    return study_from_dict(data)


# `grid.methods: all` (or `[all]`): every registered method, controls left out (they go under `controls`).
ALL_METHODS = "all"


def set_base_keys(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """A copy of the study mapping `data` with each `KEY=VALUE` (a run-config key, as `rankscope
    train --set` takes) set in its base: block, as `rankscope study --set` does: every run gets it,
    and the file's preset and method overrides still apply on top."""
    data = copy.deepcopy(data)
    if data.get("base") is None:  # absent, or `base:` left empty
        data["base"] = {}
    for text in overrides:
        key, value = parse_override(text)
        node = data["base"]
        *parents, last = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return data


def study_from_dict(data: dict) -> StudySpec:
    spec = dataclass_from_dict(StudySpec, data, "study")
    if ALL_METHODS in spec.grid.methods:
        if spec.grid.methods != [ALL_METHODS]:
            raise ConfigError(f"grid.methods {spec.grid.methods}: write `methods: all` alone, or list the methods")
        spec.grid.methods = methods.method_names()
    return spec


def run_tree(spec: StudySpec, method: str, preset: str, seed: int) -> dict:
    """The run config mapping of one cell: base, then preset, method and method-preset overrides."""
    tree = merge_trees(spec.base, spec.preset_overrides.get(preset, {}))
    tree = merge_trees(tree, spec.method_overrides.get(method, {}))
    tree = merge_trees(tree, spec.method_preset_overrides.get(method, {}).get(preset, {}))
    tree = merge_trees(tree, {"model": {"preset": preset}, "train": {"seed": seed}})
    tree["method"] = merge_trees(tree.get("method", {}) or {}, {"name": method})
    return tree


def get_path(tree: dict, dotted: str) -> Any:
    """The value at a dotted key of a config mapping (None where it is not set)."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def with_path(tree: dict, dotted: str, value: Any) -> dict:
    """A copy of `tree` with the dotted key set to `value`."""
    parts = dotted.split(".")
    update: dict = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        update = {part: update}
    return merge_trees(tree, update)


def check_grid(spec: StudySpec) -> None:
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
        if name not in study_members(spec):
            raise ConfigError(f"method_overrides names {name!r}, which is not in grid.methods {grid.methods} "
                              f"or controls {spec.controls}")
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
    for name in spec.controls:
        if name not in known:
            raise ConfigError(f"controls names unknown control {name!r}{did_you_mean(name, methods.control_names())}")
        if not methods.is_control(name):
            raise ConfigError(f"controls names {name!r}, which is a method, not a control; list it under grid.methods "
                              f"(controls: {', '.join(methods.control_names())})")
    if len(set(spec.controls)) != len(spec.controls):
        raise ConfigError(f"controls lists a control twice: {spec.controls}")
    if spec.report.informative_margin < 0:
        raise ConfigError(f"report.informative_margin = {spec.report.informative_margin} must be >= 0 (nats)")
    _check_run_trees(spec)


def plan_runs(spec: StudySpec, chosen: dict[tuple[str, str], dict[str, Any]] | None = None) -> list[PlannedRun]:
    """Resolve and validate every run config of the grid before anything is trained.

    `chosen` maps (method, preset) to the tune stage's values ({dotted key: value}); a run uses
    them except for the keys its own config sets (a run's own `optim.lr` wins).
    """
    from rankscope.methods.tuned import default_kinds

    check_grid(spec)
    planned = []
    for preset in spec.grid.presets:
        for seed in spec.grid.seeds:
            for method in study_members(spec):
                own = run_tree(spec, method, preset, seed)
                tree, tuned = own, {}
                for key, value in (chosen or {}).get((method, preset), {}).items():
                    if value is not None and get_path(own, key) is None:
                        tree = with_path(tree, key, value)
                        tuned[key] = value
                name = run_name(method, preset, seed)
                try:
                    cfg = build_config(tree)
                    check_method_settings(cfg)
                except RankscopeError as exc:
                    raise type(exc)(f"study run {name}: {exc}") from None
                if get_path(own, "optim.lr") is not None:
                    lr_source = "run"
                elif "optim.lr" in tuned:
                    lr_source = "tuned in this study"
                else:
                    lr_source = default_kinds(methods.get(method), preset)["lr"]
                planned.append(PlannedRun(name, method, preset, seed, cfg, tuned, lr_source))
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
    from rankscope.analysis.settings import AnalysisSettings, trim_default_ks

    settings = dataclass_from_dict(AnalysisSettings, trim_default_ks(dict(mapping)), "analysis")
    settings.__post_init__()
    settings.validate()
    return settings

