"""STUDY_DIR/regime.json: how every run of a study was set up, as planned, so that the report can
say where each learning rate came from and whether two methods were tuned on the same budget
(a run's config.yaml holds the lr but not its provenance). Written by the study driver before
training (study/stages.py), so it records the plan whatever happens to the study file later
(fields: docs/internals.md, "Study layout"). The report adds what it measures itself (unigram
perplexity, chance levels: `rankscope.report.regime`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rankscope import methods
from rankscope.config import config_to_dict
from rankscope.io import read_json, write_json_atomic
from rankscope.optim.roles import ROLES, effective_roles
from rankscope.study.spec import PlannedRun, StudySpec, get_path, study_members

REGIME_FILE = "regime.json"


def tuning_budget(spec: StudySpec, cell, steps: int) -> str:
    """The budget of this study's tune stage for one (method, preset), in words: equal strings mean
    equal budgets. It names the grid's size per key, so a method searched over one point is not
    "tuned on the same budget" as one searched over five."""
    from rankscope.study.tune import DENSE_AXIS

    tune = spec.tune
    # Under shared-dense the dense lr is one value shared by every method (stage 1 searched it with
    # full rank), so a budget counts each method's own axes only: full rank's block lr over five
    # values and GaLore's lr over five are the same budget.
    own = [axis for axis in cell.axes if axis.label != DENSE_AXIS] if cell else []
    grid = " x ".join(f"{len(axis.values)} {axis.label}" for axis in own) if own else "no grid"
    refine = f", top {tune.refine.top} refined on seeds {list(tune.refine.seeds)}" if tune.refine.seeds else ""
    shared = ", dense lr shared from stage 1" if tune.protocol == "shared-dense" else ""
    return (f"tune stage of study {spec.name} ({tune.protocol}{shared}): grid {grid} (up to {tune.max_extensions} "
            f"extensions), {steps} steps per run, seeds {list(tune.seeds)}{refine}, metric {tune.metric}")


# What a shipped tuned default was tuned in, as a run config's values at these keys; a run in
# another regime (other steps, batch, data or model shape) gets the value but not the claim.
SHIPPED_REGIME_KEYS = ("data.source", "data.tokenizer", "data.vocab_size", "data.seq_len", "model.overrides",
                       "train.steps", "train.batch_size")
OTHER_REGIME = "tuned here, for another regime"


def regime_of(tree: dict) -> dict[str, Any]:
    """A run config's (as a mapping) values at SHIPPED_REGIME_KEYS."""
    return {key: get_path(tree, key) for key in SHIPPED_REGIME_KEYS}


def shipped_budget(preset: str, tree: dict) -> str | None:
    """The budget behind rankscope's shipped tuned defaults of a preset, for a run (config mapping)
    trained in the regime they were tuned in; None otherwise (none shipped, or another regime)."""
    from rankscope.methods.tuned import tuned_source

    source = tuned_source().get(str(preset).strip().lower())
    if not source or source.get("regime") != regime_of(tree):
        return None
    return f"{source.get('study')} at commit {source.get('commit')} ({source.get('document')})"


def role_sources(run: PlannedRun, shipped: bool) -> dict[str, str]:
    """Where each role's lr comes from: "run" (the study sets it), "tuned in this study" (the tune
    stage's choice), "tuned here" (a shipped tuned default, for this regime when `shipped`), or
    "method lr" (unset: the role follows the method's own lr, as in the official harnesses)."""
    from rankscope.methods.tuned import tuned_values

    own = config_to_dict(run.config)
    shipped_values = tuned_values(run.method, run.preset)
    out = {}
    for role in ROLES:
        key = f"optim.{role}_lr"
        if key in run.tuned:
            out[role] = "tuned in this study"
        elif get_path(own, key) is not None:
            out[role] = "run"
        elif f"{role}_lr" in shipped_values:
            out[role] = "tuned here" if shipped else OTHER_REGIME
        else:
            out[role] = "method lr"
    return out


def write_regime(out: Path, planned: list[PlannedRun], spec: StudySpec) -> Path:
    from rankscope.study.tune import plan_tuning
    from rankscope.train.setup import resolve_optim

    chosen = read_json(out / "tune" / "chosen.json", missing={}, expect=dict,
                       fix="run the tune stage again (rankscope study STUDY.yaml --stage tune)")
    cells = {(c.method, c.preset): c for c in plan_tuning(spec)} if chosen else {}
    runs: dict[str, Any] = {}
    for run in planned:
        cfg = run.config
        optim = resolve_optim(cfg, methods.get(run.method))
        if run.lr_source == "tuned in this study":
            steps = (chosen.get("steps") or {}).get(f"{run.method}/{run.preset}", cfg.train.steps)
            budget = tuning_budget(spec, cells.get((run.method, run.preset)), steps)
        elif run.lr_source == "tuned here":
            budget = shipped_budget(run.preset, config_to_dict(cfg))
        else:
            budget = None
        lr_source = OTHER_REGIME if run.lr_source == "tuned here" and budget is None else run.lr_source
        runs[run.name] = {
            "control": methods.is_control(run.method),
            "roles": effective_roles(optim, scope_exempts_norms=optim.weight_decay_scope == "matrices"),
            # The shipped dense lrs carry the claim only in the regime they were tuned in, whatever
            # the run's own lr is (the control's is not tuned at all).
            "role_sources": role_sources(run, shipped=shipped_budget(run.preset, config_to_dict(cfg)) is not None),
            "method": run.method, "preset": run.preset, "seed": run.seed,
            "lr": optim.lr, "lr_source": lr_source, "lr_budget": budget, "tuned": dict(run.tuned),
            "weight_decay": optim.weight_decay, "warmup_steps": optim.warmup_steps,
            "min_lr_ratio": optim.min_lr_ratio, "steps": cfg.train.steps, "batch_size": cfg.train.batch_size,
            "seq_len": cfg.data.seq_len, "tokens": cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len,
        }
    regime = {
        "study": spec.name, "seeds": list(spec.grid.seeds), "presets": list(spec.grid.presets),
        "methods": list(spec.grid.methods), "controls": [c for c in study_members(spec) if methods.is_control(c)],
        "tune": "tune/chosen.json" if chosen else None,
        "tune_protocol": chosen.get("protocol", "independent") if chosen else None,
        "shared_dense": chosen.get("shared_dense") or {} if chosen else {},
        "informative_margin": spec.report.informative_margin, "runs": runs,
    }
    path = out / REGIME_FILE
    write_json_atomic(path, regime)
    return path
