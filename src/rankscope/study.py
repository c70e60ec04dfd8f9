"""Studies: a grid of methods x presets x seeds, trained, analysed, evaluated and reported.

A study file names the grid and the settings of every stage; `run_study` runs the stages in
order, each re-runnable alone. Runs that are finished are skipped and interrupted ones resume
(the trainer and the analysis both key their work on disk). One run failing is recorded in
`status.json` and the study goes on; the report lists it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rankscope import methods
from rankscope.config import RunConfig, build_config, config_to_dict, dataclass_from_dict, load_yaml
from rankscope.errors import ConfigError, RankscopeError, did_you_mean

log = logging.getLogger("rankscope.study")

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
                    _validate_method(cfg)
                except RankscopeError as exc:
                    raise type(exc)(f"study run {name}: {exc}") from None
                planned.append(PlannedRun(name, method, preset, seed, cfg))
    return planned


def _validate_method(cfg: RunConfig) -> None:
    """The method's own checks (rank vs layer shapes, ...) on the preset's shapes, before training."""
    from rankscope.models import get_preset

    model_cfg = dataclasses.replace(get_preset(cfg.model.preset), **cfg.model.overrides)
    methods.get(cfg.method.name)(cfg.method.settings, model_cfg, cfg.model.preset).validate()


def analysis_settings(spec: StudySpec):
    from rankscope.analysis.settings import AnalysisSettings

    settings = dataclass_from_dict(AnalysisSettings, dict(spec.analysis), "analysis")
    settings.__post_init__()
    settings.validate()
    return settings


# ---------------------------------------------------------------------------------------------


class StudyStatus:
    """`status.json`: per run and stage, done or failed (with the error)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}

    def set(self, run: str, stage: str, state: str, error: str | None = None) -> None:
        entry = self.data.setdefault(run, {})
        entry[stage] = {"state": state, **({"error": error} if error else {})}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)

    def failed(self, run: str) -> bool:
        return any(v.get("state") == "failed" for v in self.data.get(run, {}).values())

    def state(self, run: str, stage: str) -> str | None:
        return self.data.get(run, {}).get(stage, {}).get("state")


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, RankscopeError):
        return str(exc)
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return last


def run_study(study_file: str | Path | None, out_dir: str | Path, stages: tuple[str, ...] = STAGES,
              spec: StudySpec | None = None) -> dict[str, Any]:
    """Run the stages of a study; returns {"runs": [...], "report": path or None, "failed": [...]}."""
    if spec is None:
        spec = load_study(study_file)
    for stage in stages:
        if stage not in STAGES:
            raise ConfigError(f"unknown study stage {stage!r}{did_you_mean(stage, STAGES)}")
    planned = plan_runs(spec)
    settings = analysis_settings(spec)
    if spec.eval.tasks:
        from rankscope.analysis.downstream import _expand_task_names

        _expand_task_names(spec.eval.tasks)  # unknown task names fail here, before training
    out = Path(out_dir)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    (out / "study.yaml").write_text(yaml.safe_dump(config_to_dict(spec), sort_keys=False))
    status = StudyStatus(out / "status.json")
    report_path = None

    if "train" in stages:
        _stage_train(planned, runs_dir, status)
    if "analyze" in stages:
        _stage_analyze(planned, runs_dir, status, settings)
    if "eval" in stages:
        _stage_eval(planned, runs_dir, status, spec.eval)
    if "predict" in stages:
        _stage_predict(planned, runs_dir, out, status, spec.predictor)
    if "report" in stages:
        from rankscope.report import build_report

        report_path = build_report(out)
    failed = [p.name for p in planned if status.failed(p.name)]
    return {"runs": [p.name for p in planned], "failed": failed, "report": report_path, "out": out}


def _stage_train(planned: list[PlannedRun], runs_dir: Path, status: StudyStatus) -> None:
    from rankscope.train import train

    for index, run in enumerate(planned, 1):
        log.info("[%d/%d] train %s", index, len(planned), run.name)
        try:
            summary = train(run.config, runs_dir / run.name)
            status.set(run.name, "train", "done")
            log.info("  %s: val ppl %.2f", run.name, summary["val_ppl"])
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one failing run must not lose the others
            log.error("  %s failed: %s", run.name, _error_line(exc))
            status.set(run.name, "train", "failed", _error_line(exc))


def _trained(run: PlannedRun, runs_dir: Path, status: StudyStatus) -> bool:
    return status.state(run.name, "train") == "done" and (runs_dir / run.name / "summary.json").is_file()


def _stage_analyze(planned: list[PlannedRun], runs_dir: Path, status: StudyStatus, settings) -> None:
    from rankscope.analysis.pipeline import analyze_runs

    groups: dict[tuple[str, int], list[PlannedRun]] = {}
    for run in planned:
        groups.setdefault((run.preset, run.seed), []).append(run)
    for (preset, seed), group in groups.items():
        reference = next(r for r in group if r.method == REFERENCE_METHOD)
        if not _trained(reference, runs_dir, status):
            for run in group:
                status.set(run.name, "analyze", "failed", f"reference run {reference.name} did not finish training")
            continue
        ready = [r for r in group if _trained(r, runs_dir, status)]
        log.info("analyze preset %s seed %d: %d runs against %s", preset, seed, len(ready), reference.name)
        try:
            analyze_runs([runs_dir / r.name for r in ready], runs_dir / reference.name, settings)
            for run in ready:
                status.set(run.name, "analyze", "done")
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            for run in ready:
                status.set(run.name, "analyze", "failed", _error_line(exc))
            log.error("  analysis of preset %s seed %d failed: %s", preset, seed, _error_line(exc))


def evaluate_run(run_dir: Path, step: int | None, tasks: list[str], limit: int, batch_size: int, device: str) -> dict:
    """Downstream accuracy of one checkpoint, written to RUN_DIR/eval/step_XXXXXX.json."""
    from rankscope.analysis.downstream import evaluate_model
    from rankscope.data import prepare_data
    from rankscope.train import load_run_model
    from rankscope.train.setup import resolve_device

    loaded = load_run_model(run_dir, step, device=resolve_device(device))
    tokenizer = prepare_data(loaded.config.data).tokenizer
    result = evaluate_model(
        loaded.model, tokenizer, tasks=tasks, batch_size=batch_size, limit=limit or None,
        device=next(loaded.model.parameters()).device, seed=loaded.config.train.seed,
        max_length=loaded.config.data.seq_len,
    )
    result["step"] = loaded.step
    out = Path(run_dir) / "eval" / f"step_{loaded.step:06d}.json"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=lambda v: None))
    tmp.replace(out)
    return result


def _stage_eval(planned: list[PlannedRun], runs_dir: Path, status: StudyStatus, spec: EvalSpec) -> None:
    for run in planned:
        if not _trained(run, runs_dir, status):
            continue
        final = run.config.train.steps
        if (runs_dir / run.name / "eval" / f"step_{final:06d}.json").is_file():
            status.set(run.name, "eval", "done")
            continue
        log.info("eval %s on %s", run.name, ", ".join(spec.tasks))
        try:
            evaluate_run(runs_dir / run.name, final, spec.tasks, spec.limit, spec.batch_size, spec.device)
            status.set(run.name, "eval", "done")
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            status.set(run.name, "eval", "failed", _error_line(exc))
            log.error("  eval of %s failed: %s", run.name, _error_line(exc))


# ---------------------------------------------------------------------------------------------
# predictor


def _stage_predict(planned, runs_dir: Path, out: Path, status: StudyStatus, spec: PredictorSpec) -> None:
    from rankscope.analysis.features import predictor_table
    from rankscope.analysis.predictor import GEOMETRY_FEATURES, fit_predictors

    table = predictor_table(planned, runs_dir)
    table.to_csv(out / "predictor_features.csv", index=False)
    if table.empty:
        log.warning("predictor: no finished runs")
        return
    geometry = list(spec.features) or list(GEOMETRY_FEATURES)
    feature_sets = {"val_loss": ["val_loss"], "geometry": geometry, "val_loss+geometry": ["val_loss", *geometry]}
    result = fit_predictors(table, target="downstream_acc", feature_sets=feature_sets, alpha=spec.alpha, missing=spec.missing)
    result.to_csv(out / "predictor.csv", index=False)

