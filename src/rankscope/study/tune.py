"""The tune stage: per (method, preset), a grid over hyper-parameters, searched before training.

Each hyper-parameter of the study's `tune:` block is a dotted run-config key (optim.lr,
optim.warmup_ratio, optim.weight_decay, method.scale, ...) with absolute values or multipliers of
the method's default at the preset. For every (method, preset) the stage trains the grid's points
(their cartesian product) for `tune.steps` steps with each of `tune.seeds`, through the same
launchers as every other stage (workers, SLURM, resume, per-run logs, failure records). Then:

1. Edges: where the best point (lowest mean metric over the seeds) has a parameter at the edge
   of its values, the grid grows one value in that direction (x the ratio of the two outermost
   values, or + their difference for `scale: linear`), at most `max_extensions` times per
   parameter and direction and never past its `min` / `max`. Rounds repeat until no edge moves.
2. Refinement (optional): the `refine.top` best points get the `refine.seeds` too.
3. Choice: the point with the lowest mean over all its seeds (among the refined points, when
   there are any). A diverged run (non-finite, or ending worse than it started) scores worst;
   a run that failed for another reason leaves its point unscored. A choice still on an edge is
   flagged (`at_edge`), with the reason the grid could not grow.

Everything is re-derived from the finished runs on disk, so an interrupted stage resumes where it
was and makes the same decisions. Files (docs/internals.md): STUDY_DIR/tune/runs/<run>/,
tune/results/<run>.json, tune/status.json, tune/results.csv, tune/chosen.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankscope import methods
from rankscope.config import build_config, config_to_dict, dataclass_from_dict, merge_trees
from rankscope.errors import ConfigError, RankscopeError, did_you_mean
from rankscope.io import read_json, write_json_atomic
from rankscope.optim.roles import ROLE_FIELDS
from rankscope.study.jobs import TUNE_METRICS, TuneJob
from rankscope.study.spec import (
    CAN_SEPARATE,
    CANNOT_SEPARATE,
    DENSE_KEYS,
    REFERENCE_METHOD,
    TUNE_PROTOCOLS,
    ParamGrid,
    StudySpec,
    get_path,
    run_tree,
    study_members,
    with_path,
)
from rankscope.study.status import JobFiles, StudyStatus

log = logging.getLogger("rankscope.study")

SCALES = ("log", "linear")
ANCHORS = ("default", "literature")
CHOSEN_FILE = "chosen.json"
DENSE_AXIS = "dense_lr"  # stage 1's axis of the one lr shared by the embeddings, head and norms
RESULTS_FILE = "results.csv"


@dataclass(frozen=True)
class Axis:
    """One hyper-parameter of a cell: its key, initial values (sorted) and how it extends."""

    key: str
    values: tuple[float, ...]
    default: float | None
    scale: str = "log"
    min: float | None = None
    max: float | None = None
    tied: tuple[str, ...] = ()  # more keys that always take this axis's value (the dense lrs)
    name: str | None = None  # the label in run names; default: the key's last part

    @property
    def label(self) -> str:
        return self.name or self.key.rsplit(".", 1)[-1]

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key, *self.tied)

    def step(self, edge: float, inner: float) -> float:
        """The next value past `edge`, away from `inner` (its neighbour on the grid)."""
        value = edge * (edge / inner) if self.scale == "log" else edge + (edge - inner)
        return round_value(value)

    def allows(self, value: float) -> str | None:
        """Why `value` is out of this axis's bounds (None: it is not)."""
        if self.min is not None and value < self.min:
            return f"{self.key} min {self.min:g}"
        if self.max is not None and value > self.max:
            return f"{self.key} max {self.max:g}"
        if self.scale == "log" and not value > 0:
            return f"{self.key} must stay positive on a log grid"
        return None


Point = tuple[float, ...]  # one value per axis, in the cell's axis order


@dataclass
class Cell:
    """One (method, preset) of the tune stage and everything its search has found so far."""

    method: str
    preset: str
    tree: dict  # the tuning runs' config mapping, without the axes' values and the seed
    axes: list[Axis]
    # 0: the independent protocol; 1, 2: the stages of the shared-dense protocol.
    stage: int = 0
    # Values stage 1 chose that a stage-2 cell runs with (in `tree` once set by `with_fixed`).
    fixed: dict[str, float] = field(default_factory=dict)
    points: dict[Point, str] = field(default_factory=dict)  # point -> how it got in: grid | extension
    refined: list[Point] = field(default_factory=list)
    extensions: dict[tuple[int, str], int] = field(default_factory=dict)  # (axis, low|high) -> count
    blocked: dict[tuple[int, str], str] = field(default_factory=dict)  # (axis, low|high) -> why it stopped

    def __post_init__(self) -> None:
        for point in itertools.product(*(axis.values for axis in self.axes)):
            self.points.setdefault(point, "grid")

    def label(self, point: Point) -> str:
        return "_".join(f"{axis.label}{value:.4g}" for axis, value in zip(self.axes, point))

    def fixed_label(self) -> str:
        values = sorted(set(self.fixed.values()))
        return f"-dense{'_'.join(f'{v:.4g}' for v in values)}" if values else ""

    def run_name(self, point: Point, seed: int) -> str:
        # Stage 2's runs carry stage 1's choice in their name: another choice is another run.
        # A control has no axis of its own: its name is stage 1's choice alone.
        middle = f"{self.label(point)}{self.fixed_label()}".lstrip("-")
        return f"{self.method}-{self.preset}-{middle}-s{seed}"

    def config_tree(self, point: Point, seed: int) -> dict:
        tree = self.tree
        for key, value in self.values(point).items():
            tree = with_path(tree, key, value)
        return with_path(tree, "train.seed", seed)

    def values(self, point: Point) -> dict[str, float]:
        return {key: value for axis, value in zip(self.axes, point) for key in axis.keys}

    def with_fixed(self, fixed: dict[str, float]) -> Cell:
        """This stage-2 cell with stage 1's values set in every run's config."""
        tree = self.tree
        for key, value in fixed.items():
            tree = with_path(tree, key, value)
        return Cell(self.method, self.preset, tree, self.axes, stage=self.stage, fixed=dict(fixed))


def round_value(value: float) -> float:
    """Six significant digits: grid values stay readable (0.0025, not 0.0025000000000000005)."""
    return float(f"{value:.6g}")


# ---------------------------------------------------------------------------------------------
# planning: the cells of the stage, validated before anything runs


def tuning_enabled(spec: StudySpec) -> bool:
    return bool(spec.tune.params or spec.tune.method_params)


def plan_tuning(spec: StudySpec) -> list[Cell]:
    """The cells of the tune stage with their initial grids; raises ConfigError for a bad block."""
    tune = spec.tune
    if not tuning_enabled(spec):
        return []
    if tune.metric not in TUNE_METRICS:
        raise ConfigError(f"tune.metric {tune.metric!r} is unknown{did_you_mean(tune.metric, TUNE_METRICS)}; "
                          f"use one of {', '.join(TUNE_METRICS)}")
    if not tune.seeds or len(set(tune.seeds)) != len(tune.seeds):
        raise ConfigError(f"tune.seeds {tune.seeds} must list at least one seed, each once")
    overlap = sorted(set(tune.seeds) & set(tune.refine.seeds))
    if overlap or len(set(tune.refine.seeds)) != len(tune.refine.seeds):
        raise ConfigError(f"tune.refine.seeds {tune.refine.seeds} must be new seeds, each once (not in tune.seeds)")
    if tune.refine.top < 1:
        raise ConfigError(f"tune.refine.top must be at least 1, got {tune.refine.top}")
    if tune.max_extensions < 0:
        raise ConfigError(f"tune.max_extensions must be >= 0, got {tune.max_extensions}")
    if tune.steps is not None and tune.steps < 1:
        raise ConfigError(f"tune.steps must be positive, got {tune.steps}")
    if tune.protocol not in TUNE_PROTOCOLS:
        raise ConfigError(f"tune.protocol {tune.protocol!r} is unknown{did_you_mean(tune.protocol, TUNE_PROTOCOLS)}; "
                          f"use one of {', '.join(TUNE_PROTOCOLS)}")
    shared = tune.protocol == "shared-dense"
    members = study_members(spec)
    method_names = tune.methods or members
    if shared:  # a control has nothing of its own to tune once the dense lrs are shared
        method_names = [name for name in method_names if not methods.is_control(name)]
        if REFERENCE_METHOD not in method_names:
            raise ConfigError(f"tune.protocol shared-dense tunes the dense lrs with {REFERENCE_METHOD!r}, which "
                              f"tune.methods leaves out; add it, or set tune.protocol: independent")
        if not tune.dense_keys or any(key not in DENSE_KEYS for key in tune.dense_keys):
            raise ConfigError(f"tune.dense_keys {tune.dense_keys} must list some of {', '.join(DENSE_KEYS)}")
    presets = tune.presets or spec.grid.presets
    for name in method_names:
        if name not in members:
            raise ConfigError(f"tune.methods names {name!r}, which is not in grid.methods {spec.grid.methods} "
                              f"or controls {spec.controls}")
    for name in presets:
        if name not in spec.grid.presets:
            raise ConfigError(f"tune.presets names {name!r}, which is not in grid.presets {spec.grid.presets}")
    for name in tune.method_params:
        if name not in method_names:
            raise ConfigError(f"tune.method_params names {name!r}, which is not a tuned method ({', '.join(method_names)})")
    cells = []
    for preset in presets:
        for method in method_names:
            grids = dict(tune.params)
            for key, grid in (tune.method_params.get(method) or {}).items():
                if grid is None:
                    grids.pop(key, None)  # `key: null` leaves a parameter of `params` untuned for this method
                else:
                    grids[key] = grid
            own = run_tree(spec, method, preset, 0)
            for key in [k for k in grids if get_path(own, k) is not None]:
                # The study sets it for these runs: the train stage would not use a choice.
                log.info("tune: %s/%s sets %s itself; not tuned", method, preset, key)
                del grids[key]
            if shared:
                for key in tune.dense_keys:
                    if key in grids or get_path(own, key) is not None:
                        raise ConfigError(f"{method}/{preset}: {key} is set by the study or its tune grid, but with "
                                          "tune.protocol shared-dense stage 1 chooses it for every method; remove it "
                                          "or set tune.protocol: independent")
            stage = 0 if not shared else (1 if method == REFERENCE_METHOD else 2)
            if not grids and stage != 1:
                continue
            tree = _tuning_tree(spec, method, preset)
            axes = [_axis(key, grid, tree, method, preset) for key, grid in sorted(grids.items())]
            if stage == 1:
                dense = _axis(tune.dense_keys[0], tune.dense, tree, method, preset, where="tune.dense")
                axes.insert(0, dataclasses.replace(dense, tied=tuple(tune.dense_keys[1:]), name=DENSE_AXIS))
            cell = Cell(method, preset, tree, axes, stage=stage)
            # Every grid point must make a valid run config (stage 2 with any of stage 1's values).
            probes = [cell] if stage != 2 else [cell.with_fixed({k: v for k in tune.dense_keys}) for v in
                                                _axis(tune.dense_keys[0], tune.dense, tree, method, preset,
                                                      where="tune.dense").values]
            for probe in probes:
                for point in probe.points:
                    _checked_config(probe, point, tune.seeds[0])
            cells.append(cell)
    return cells


def plan_controls(spec: StudySpec) -> list[Cell]:
    """Under shared-dense, one cell without axes per (control, tuned preset): the control trains at
    stage 1's dense lr with the tuning seeds, so chosen.json says whether the tuning regime itself
    can separate the methods (its choices mean little where the control ties the best method)."""
    if not tuning_enabled(spec) or spec.tune.protocol != "shared-dense":
        return []
    presets = spec.tune.presets or spec.grid.presets
    return [Cell(name, preset, _tuning_tree(spec, name, preset), [], stage=2)
            for preset in presets for name in study_members(spec) if methods.is_control(name)]


def _tuning_tree(spec: StudySpec, method: str, preset: str) -> dict:
    """A tuning run's config mapping: the study's own for the cell, with the tune stage's steps, no
    intermediate checkpoints (a tuning run is scored, not analysed), then `tune.run`."""
    tree = run_tree(spec, method, preset, 0)
    steps = spec.tune.steps or get_path(tree, "train.steps") or build_config(tree).train.steps
    tree = merge_trees(tree, {"train": {"steps": steps, "checkpoint_steps": [], "checkpoint_every": 0}})
    return merge_trees(tree, spec.tune.run)


def _axis(key: str, mapping: Any, tree: dict, method: str, preset: str, where: str | None = None) -> Axis:
    where = f"{where or 'tune grid ' + repr(key)} of {method}/{preset}"
    if isinstance(mapping, ParamGrid):
        grid = mapping
    elif isinstance(mapping, dict):
        grid = dataclass_from_dict(ParamGrid, mapping, f"tune.params.{key}")
    elif isinstance(mapping, (list, tuple)):  # a bare list: absolute values
        grid = ParamGrid(values=list(mapping))
    else:
        raise ConfigError(f"{where}: expected a mapping with values: or multipliers:, got {mapping!r}")
    if grid.scale not in SCALES:
        raise ConfigError(f"{where}: scale {grid.scale!r} is unknown; use one of {', '.join(SCALES)}")
    if grid.around not in ANCHORS:
        raise ConfigError(f"{where}: around {grid.around!r} is unknown; use one of {', '.join(ANCHORS)}")
    if bool(grid.values) == bool(grid.multipliers):
        raise ConfigError(f"{where}: give exactly one of values: (absolute) or multipliers: (x the method's default)")
    default = default_value(tree, key)
    if grid.multipliers:
        anchor = literature_value(tree, key) if grid.around == "literature" else default
        if anchor is None:
            raise ConfigError(f"{where}: the method has no {grid.around} value for {key} to multiply; "
                              "give values: instead")
        raw = [anchor * float(m) for m in grid.multipliers]
    else:
        raw = [float(v) for v in grid.values]
    values = tuple(sorted({round_value(v) for v in raw}))
    if any(not math.isfinite(v) for v in values):
        raise ConfigError(f"{where}: values must be finite numbers, got {list(values)}")
    axis = Axis(key, values, default, grid.scale, grid.min, grid.max)
    for value in values:
        reason = axis.allows(value)
        if reason:
            raise ConfigError(f"{where}: {value:g} is outside the grid's bounds ({reason})")
    return axis


def default_value(tree: dict, key: str) -> float | None:
    """What a run of this config mapping uses for `key` when the tuning does not set it."""
    from rankscope.train.setup import resolve_optim

    cfg = build_config(tree)
    section, _, name = key.partition(".")
    if section == "optim":
        value = getattr(cfg.optim, name, None)
        if value is None:
            resolved = resolve_optim(cfg, methods.get(cfg.method.name))
            role, _, kind = name.partition("_")
            if name in ROLE_FIELDS:  # an unset role follows the method's own value
                value = resolved.roles.get(role, {}).get(kind, getattr(resolved, kind))
            else:
                value = getattr(resolved, name, None)
    elif section == "method":
        value = getattr(cfg.method.settings, name, None)
    else:
        value = get_path(config_to_dict(cfg), key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def literature_value(tree: dict, key: str) -> float | None:
    """The method's official-harness value of an optim key (None for keys it has no value for)."""
    section, _, name = key.partition(".")
    if section != "optim":
        return default_value(tree, key)
    cfg = build_config(tree)
    literature = methods.get(cfg.method.name).optim_defaults(cfg.model.preset)
    value = getattr(literature, name, None)
    if value is None and name in ROLE_FIELDS:  # an unset role follows the method's own value
        value = getattr(literature, name.partition("_")[2], None)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _checked_config(cell: Cell, point: Point, seed: int) -> dict:
    """The run config (as a mapping) of one tuning run, validated."""
    from rankscope.train.setup import check_method_settings

    try:
        cfg = build_config(cell.config_tree(point, seed))
        check_method_settings(cfg)
    except RankscopeError as exc:
        raise type(exc)(f"tuning run {cell.run_name(point, seed)}: {exc}") from None
    return config_to_dict(cfg)


# ---------------------------------------------------------------------------------------------
# the search


def tune_jobs(cells: list[Cell], tune_dir: Path, spec: StudySpec) -> list[TuneJob]:
    jobs = []
    for cell in cells:
        for point in cell.points:
            seeds = list(spec.tune.seeds) + (list(spec.tune.refine.seeds) if point in cell.refined else [])
            for seed in seeds:
                name = cell.run_name(point, seed)
                jobs.append(TuneJob(stage="tune", name=name, runs=(name,), run_dir=str(tune_dir / "runs" / name),
                                    config=_checked_config(cell, point, seed),
                                    result_file=str(tune_dir / "results" / f"{name}.json"),
                                    metric=spec.tune.metric, keep_checkpoints=spec.tune.keep_checkpoints))
    return jobs


def run_tune(spec: StudySpec, cells: list[Cell], out: Path, launcher, board) -> dict[str, Any]:
    """Run the stage to its end and write tune/chosen.json (returned). Independent protocol: every
    cell's search at once. Shared-dense: stage 1 (full rank with the dense lr) first, then every
    stage-2 cell with the dense lr stage 1 chose for its preset."""
    tune_dir = out / "tune"
    status = StudyStatus(tune_dir / "status.json")
    searched = [c for c in cells if c.stage != 2]
    results = _search(searched, spec, out, launcher, status, board)
    shared = shared_dense_values(searched, results, spec)
    stage2 = [cell.with_fixed(shared[cell.preset]) for cell in cells if cell.stage == 2 and cell.preset in shared]
    controls = [cell.with_fixed(shared[cell.preset]) for cell in plan_controls(spec) if cell.preset in shared]
    if stage2 or controls:
        results.update(_search(stage2 + controls, spec, out, launcher, status, board))
    unfixed = [cell for cell in cells if cell.stage == 2 and cell.preset not in shared]
    chosen = choose(searched + stage2 + unfixed, results, spec, out)
    # The plan's fingerprint (stage 2 as planned, before stage 1's values were set in it).
    chosen["fingerprint"] = tune_fingerprint(cells, spec)
    chosen["shared_dense"] = shared
    chosen["controls"] = choose(controls, results, spec, out)["cells"]
    chosen["informativeness"] = tuning_informativeness(chosen, spec.report.informative_margin)
    for preset, verdict in chosen["informativeness"].items():
        log.info("tune %s: the %s control at the shared dense lr ends %.3f nats behind the best tuned method (%s); "
                 "margin %.3g: the tuning regime %s", preset, verdict["control"], verdict["gap"], verdict["best_method"],
                 verdict["margin"], verdict["verdict"])
    write_results_table(searched + stage2 + controls, results, spec, tune_dir, out)
    write_json_atomic(tune_dir / CHOSEN_FILE, chosen)
    return chosen


def tuning_informativeness(chosen: dict[str, Any], margin: float) -> dict[str, dict[str, Any]]:
    """{preset: verdict} of the tuning regime: the control's score at the shared dense lr against
    the best chosen score of any method (both over the same seeds), as the report judges a study."""
    verdicts = {}
    for control in chosen.get("controls") or []:
        preset = control["preset"]
        scored = [row for row in chosen["cells"] if row["preset"] == preset and row.get("score") is not None]
        if control.get("score") is None or not scored:
            continue
        best = min(scored, key=lambda row: row["score"])
        gap = control["score"] - best["score"]
        verdicts[preset] = {"control": control["method"], "control_score": control["score"],
                            "best_method": best["method"], "best_score": best["score"], "gap": gap,
                            "margin": margin, "verdict": CAN_SEPARATE if gap > margin else CANNOT_SEPARATE}
    return verdicts


def _search(cells: list[Cell], spec: StudySpec, out: Path, launcher, status, board) -> dict[str, dict]:
    """Rounds of edge extension, then refinement, for `cells`; their runs' results."""
    from rankscope.study.engine import run_jobs

    tune_dir = out / "tune"
    results: dict[str, dict] = {}
    while True:
        jobs = tune_jobs(cells, tune_dir, spec)
        run_jobs(jobs, launcher, out, status, board)
        results = read_results(jobs)
        grown = [extend(cell, results, spec) for cell in cells]
        if not any(grown):
            break
    if spec.tune.refine.seeds:
        for cell in cells:
            cell.refined = best_points(cell, results, spec.tune.seeds)[: spec.tune.refine.top]
        jobs = tune_jobs(cells, tune_dir, spec)
        run_jobs(jobs, launcher, out, status, board)
        results = read_results(jobs)
    return results


def shared_dense_values(cells: list[Cell], results: dict[str, dict], spec: StudySpec) -> dict[str, dict[str, float]]:
    """{preset: {dense key: value}} from stage 1's choice per preset (none for a preset whose stage
    1 chose nothing: its stage 2 does not run, and chosen.json says why)."""
    shared = {}
    for cell in cells:
        if cell.stage != 1:
            continue
        point = _chosen_point(cell, results, spec)
        if point is not None:
            values = cell.values(point)
            shared[cell.preset] = {key: values[key] for key in spec.tune.dense_keys}
    return shared


def read_results(jobs: list[TuneJob]) -> dict[str, dict]:
    """{tuning run name: its result} for every job scored under its current definition (a result
    of a run whose steps, config or metric have changed since is not read)."""
    results = {}
    for job in jobs:
        data = job.read_result()
        if data is not None:
            results[job.name] = data
    return results


def point_score(cell: Cell, point: Point, seeds: list[int], results: dict[str, dict]) -> tuple[float, list[float]] | None:
    """(mean, per-seed scores) of a point over `seeds`; diverged runs score +inf; None when a
    seed has no result (failed or not run)."""
    scores = []
    for seed in seeds:
        result = results.get(cell.run_name(point, seed))
        if result is None:
            return None
        score = result.get("score")
        scores.append(math.inf if result.get("diverged") or score is None else float(score))
    return sum(scores) / len(scores), scores


def best_points(cell: Cell, results: dict[str, dict], seeds: list[int]) -> list[Point]:
    """The cell's points with a finite score over `seeds`, best first (ties: the smaller values)."""
    scored = []
    for point in cell.points:
        score = point_score(cell, point, seeds, results)
        if score is not None and math.isfinite(score[0]):
            scored.append((score[0], point))
    return [point for _, point in sorted(scored)]


def _line(cell: Cell, point: Point, index: int) -> list[float]:
    """The values axis `index` takes among the points that equal `point` on every other axis."""
    return sorted({p[index] for p in cell.points if all(p[i] == point[i] for i in range(len(point)) if i != index)})


def extend(cell: Cell, results: dict[str, dict], spec: StudySpec) -> bool:
    """Grow the grid where its best point sits on an edge; True when a point was added."""
    ranked = best_points(cell, results, spec.tune.seeds)
    if not ranked:
        return False
    best = ranked[0]
    grown = False
    for index, axis in enumerate(cell.axes):
        line = _line(cell, best, index)
        if len(line) < 2:
            continue  # a single value is fixed, not tuned: there is no direction to grow in
        for side, edge, inner in (("low", line[0], line[1]), ("high", line[-1], line[-2])):
            if best[index] != edge or (index, side) in cell.blocked:
                continue
            if cell.extensions.get((index, side), 0) >= spec.tune.max_extensions:
                cell.blocked[(index, side)] = f"tune.max_extensions ({spec.tune.max_extensions}) reached"
                continue
            value = axis.step(edge, inner)
            reason = axis.allows(value)
            point = best[:index] + (value,) + best[index + 1:]
            if reason is None:
                try:
                    _checked_config(cell, point, spec.tune.seeds[0])
                except RankscopeError as exc:
                    reason = str(exc)
            if reason is not None:
                cell.blocked[(index, side)] = reason
                continue
            cell.points.setdefault(point, "extension")
            cell.extensions[(index, side)] = cell.extensions.get((index, side), 0) + 1
            log.info("tune %s/%s: best %s at the %s edge; adding %s", cell.method, cell.preset, cell.label(best),
                     side, cell.label(point))
            grown = True
    return grown


def choose(cells: list[Cell], results: dict[str, dict], spec: StudySpec, out: Path) -> dict[str, Any]:
    """chosen.json: per cell the values of the best point, its score and where it sits on the grid."""
    rows = []
    for cell in cells:
        seeds = _cell_seeds(cell, spec)
        scored = _scored_points(cell, results, seeds)
        statuses = [_run_state(cell, point, seed, results, out) for point in cell.points
                    for seed in spec.tune.seeds]
        row: dict[str, Any] = {
            "method": cell.method, "preset": cell.preset, "stage": cell.stage, "fixed": dict(cell.fixed), "values": None, "score": None, "score_std": None,
            "seed_scores": None, "seeds": seeds, "defaults": {a.key: a.default for a in cell.axes},
            "points": len(cell.points), "diverged_runs": statuses.count("diverged"),
            "failed_runs": statuses.count("failed"), "at_edge": {}, "note": "",
        }
        if cell.stage == 2 and not cell.fixed:
            row["note"] = "stage 1 chose no dense lr for this preset, so stage 2 did not run: defaults kept"
            rows.append(row)
            continue
        if not scored:
            row["note"] = ("every tuning run diverged or failed: the train stage keeps the defaults"
                           if statuses else "no tuning run finished")
            rows.append(row)
            continue
        mean, point, per_seed = min(scored, key=lambda item: (item[0], item[1]))
        std = (sum((s - mean) ** 2 for s in per_seed) / (len(per_seed) - 1)) ** 0.5 if len(per_seed) > 1 else None
        row.update(values=cell.values(point), score=mean, score_std=std, seed_scores=per_seed)
        grid_best = best_points(cell, results, spec.tune.seeds)[:1]
        # Edges grow from the grid seeds' best point; the refinement seeds can move the choice to
        # an edge that point was not on, which then stays unexplored.
        moved = (f"not extended: the grid seeds' best point ({cell.label(grid_best[0])}) is not on this edge; the "
                 "refinement seeds moved the choice here" if grid_best and grid_best[0] != point else "not extended")
        for index, axis in enumerate(cell.axes):
            line = _line(cell, point, index)
            if len(line) < 2:
                continue
            for side, edge in (("low", line[0]), ("high", line[-1])):
                if point[index] == edge:
                    row["at_edge"][axis.key] = {"side": side, "reason": cell.blocked.get((index, side), moved)}
        rows.append(row)
    return {
        "study": spec.name, "fingerprint": tune_fingerprint(cells, spec), "metric": spec.tune.metric,
        "protocol": spec.tune.protocol, "members": study_members(spec), "dense_keys": list(spec.tune.dense_keys) if spec.tune.protocol == "shared-dense" else [],
        "seeds": list(spec.tune.seeds), "refine_seeds": list(spec.tune.refine.seeds),
        "max_extensions": spec.tune.max_extensions,
        "steps": {f"{c.method}/{c.preset}": get_path(c.tree, "train.steps") for c in cells},
        "cells": rows,
    }


def _cell_seeds(cell: Cell, spec: StudySpec) -> list[int]:
    # With refinement, only the refined points have every seed (point_score skips the others).
    return list(spec.tune.seeds) + (list(spec.tune.refine.seeds) if cell.refined else [])


def _scored_points(cell: Cell, results: dict[str, dict], seeds: list[int]) -> list[tuple[float, Point, list[float]]]:
    scored = []
    for point in cell.points:
        score = point_score(cell, point, seeds, results)
        if score is not None and math.isfinite(score[0]):
            scored.append((score[0], point, score[1]))
    return scored


def _chosen_point(cell: Cell, results: dict[str, dict], spec: StudySpec) -> Point | None:
    """The point with the lowest mean over all its seeds (ties: the smaller values); None if none scored."""
    scored = _scored_points(cell, results, _cell_seeds(cell, spec))
    return min(scored, key=lambda item: (item[0], item[1]))[1] if scored else None


def _run_state(cell: Cell, point: Point, seed: int, results: dict[str, dict], out: Path) -> str:
    name = cell.run_name(point, seed)
    result = results.get(name)
    if result is not None:
        return "diverged" if result.get("diverged") else "done"
    outcome = JobFiles(out, "tune", name).read_outcome() or {}
    return "failed" if outcome.get("state") == "failed" else "missing"


def write_results_table(cells: list[Cell], results: dict[str, dict], spec: StudySpec, tune_dir: Path, out: Path) -> Path:
    """tune/results.csv: one row per tuning run."""
    import pandas as pd

    keys = sorted({key for cell in cells for axis in cell.axes for key in axis.keys})
    rows = []
    for cell in cells:
        for point, origin in cell.points.items():
            seeds = list(spec.tune.seeds) + (list(spec.tune.refine.seeds) if point in cell.refined else [])
            for seed in seeds:
                name = cell.run_name(point, seed)
                result = results.get(name) or {}
                outcome = JobFiles(out, "tune", name).read_outcome() or {}
                state = _run_state(cell, point, seed, results, out)
                rows.append({
                    "method": cell.method, "preset": cell.preset, "stage": cell.stage, "point": cell.label(point),
                    **{key: cell.values(point).get(key, cell.fixed.get(key)) for key in keys},
                    "seed": seed, "phase": "refine" if seed in spec.tune.refine.seeds else origin,
                    "state": state, "metric": spec.tune.metric, "score": result.get("score"),
                    "val_loss": result.get("val_loss"), "initial_val_loss": result.get("initial_val_loss"),
                    "steps": result.get("steps"), "train_time": result.get("train_time"),
                    "error": result.get("error") or (outcome.get("error") if state == "failed" else None),
                    "run": name,
                })
    path = tune_dir / RESULTS_FILE
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame = frame.sort_values(["preset", "method", *keys, "seed"], kind="stable")
    frame.to_csv(path, index=False)
    return path


# ---------------------------------------------------------------------------------------------
# the train stage's side


def tune_fingerprint(cells: list[Cell], spec: StudySpec) -> str:
    """Hash of everything that decides the tune stage's choice (the initial grids, the tuning
    runs' configs, seeds, metric, extension and refinement rules)."""
    data = {"tune": config_to_dict(spec.tune),
            "cells": [[c.method, c.preset, c.tree, [[a.key, list(a.values)] for a in c.axes]] for c in cells]}
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_chosen(spec: StudySpec, cells: list[Cell], out: Path) -> dict[tuple[str, str], dict[str, float]]:
    """{(method, preset): {key: value}} from tune/chosen.json, for the train stage. Refuses results
    of another `tune:` block, and missing ones."""
    path = out / "tune" / CHOSEN_FILE
    # A damaged chosen.json is an error of its own, never "does not exist yet".
    data = read_json(path, expect=dict, fix="run the tune stage again (rankscope study STUDY.yaml --stage tune); "
                                           "its finished tuning runs are not trained again")
    if data is None:
        raise ConfigError(f"the study has a tune: block but {path} does not exist yet; run the tune stage first "
                          "(rankscope study STUDY.yaml --stage tune, or all stages)")
    if data.get("fingerprint") != tune_fingerprint(cells, spec):
        raise ConfigError(f"{path} holds the results of another tune: block or run config; run the tune stage "
                          "again (rankscope study STUDY.yaml --stage tune)")
    chosen: dict[tuple[str, str], dict[str, float]] = {}
    # Shared-dense: stage 1's dense lrs go to every method and control of the study at that preset,
    # tuned in stage 2 or not (a method's own choice is added below).
    for preset, values in (data.get("shared_dense") or {}).items():
        for member in study_members(spec):
            chosen[(member, preset)] = dict(values)
    for row in data.get("cells", []):
        if row.get("values"):
            key = (row["method"], row["preset"])
            chosen[key] = {**chosen.get(key, {}), **dict(row["values"])}
        else:
            log.warning("tune %s/%s chose nothing (%s); its runs keep the defaults", row.get("method"),
                        row.get("preset"), row.get("note"))
    return chosen
