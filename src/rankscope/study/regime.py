"""STUDY_DIR/regime.json: how every run of a study was set up, as planned, so that the report can
say where each learning rate came from and whether two methods were tuned on the same budget
(a run's config.yaml holds the lr but not its provenance). Written by the study driver after
training and before the report (fields: docs/internals.md, "Study layout"). The report adds what
it measures itself (unigram perplexity, chance levels: `rankscope.report.regime`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rankscope import methods
from rankscope.study.spec import PlannedRun, StudySpec
from rankscope.study.status import read_json, write_json_atomic

REGIME_FILE = "regime.json"


def tuning_budget(spec: StudySpec, steps: int) -> str:
    """The budget of this study's tune stage, in words: equal strings mean equal budgets."""
    tune = spec.tune
    refine = f", top {tune.refine.top} refined on seeds {list(tune.refine.seeds)}" if tune.refine.seeds else ""
    return (f"tune stage of study {spec.name}: {steps} steps per run, seeds {list(tune.seeds)}{refine}, "
            f"metric {tune.metric}")


def shipped_budget(preset: str) -> str | None:
    """The budget behind rankscope's shipped tuned defaults of a preset (None: none shipped)."""
    from rankscope.methods.tuned import tuned_source

    source = tuned_source().get(str(preset))
    if not source:
        return None
    return f"{source.get('study')} at commit {source.get('commit')} ({source.get('document')})"


def write_regime(out: Path, planned: list[PlannedRun], spec: StudySpec) -> Path:
    from rankscope.train.setup import resolve_optim

    chosen = read_json(out / "tune" / "chosen.json") or {}
    runs: dict[str, Any] = {}
    for run in planned:
        cfg = run.config
        optim = resolve_optim(cfg, methods.get(run.method))
        if run.lr_source == "tuned in this study":
            steps = (chosen.get("steps") or {}).get(f"{run.method}/{run.preset}", cfg.train.steps)
            budget = tuning_budget(spec, steps)
        elif run.lr_source == "tuned here":
            budget = shipped_budget(run.preset)
        else:
            budget = None
        runs[run.name] = {
            "method": run.method, "preset": run.preset, "seed": run.seed,
            "lr": optim.lr, "lr_source": run.lr_source, "lr_budget": budget, "tuned": dict(run.tuned),
            "weight_decay": optim.weight_decay, "warmup_steps": optim.warmup_steps,
            "min_lr_ratio": optim.min_lr_ratio, "steps": cfg.train.steps, "batch_size": cfg.train.batch_size,
            "seq_len": cfg.data.seq_len, "tokens": cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len,
        }
    regime = {
        "study": spec.name, "seeds": list(spec.grid.seeds), "presets": list(spec.grid.presets),
        "methods": list(spec.grid.methods), "tune": "tune/chosen.json" if chosen else None, "runs": runs,
    }
    path = out / REGIME_FILE
    write_json_atomic(path, regime)
    return path
