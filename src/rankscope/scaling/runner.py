"""`rankscope scaling SPEC.yaml`: a grid of model sizes x token budgets per method, trained through
the study machinery, then fitted and reported.

Each token budget becomes one study (OUT/budgets/<label>/, the usual study layout) whose grid is
the spec's methods x sizes x seeds and whose per-size `train.steps` give every run the budget's
tokens; `rankscope.study.run_study` trains it, so finished runs are skipped, interrupted ones
resume and a failing run is recorded without stopping the others. Every run of every budget is
planned and validated before the first one trains. The runs' final validation losses, their
parameter counts and their measured FLOPs per token become OUT/scaling.csv, which
`rankscope.scaling.analyze.analyze_table` fits (the same step as `rankscope scaling fit`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from rankscope.config import (
    build_config,
    config_from_dict,
    config_to_dict,
    dataclass_from_dict,
    load_yaml,
    merge_trees,
)
from rankscope.errors import ConfigError
from rankscope.io import read_json
from rankscope.scaling.family import FAMILY, non_embedding_params
from rankscope.scaling.fit import MIN_BUDGETS, MIN_SIZES, FitSettings, ScalingFitError

log = logging.getLogger("rankscope.scaling")

PARAMS_KINDS = ("non_embedding", "total")
# Settings that decide a run's tokens: the budget sets them, so no method may change them.
TOKEN_KEYS = (("train", "steps"), ("train", "batch_size"), ("data", "seq_len"))


@dataclass
class ScalingSpec:
    name: str = "scaling"
    methods: list[str] = field(default_factory=lambda: ["full"])
    sizes: list[str] = field(default_factory=lambda: list(FAMILY[:4]))  # presets, smallest first
    # Token budgets: absolute training tokens per run, or multiples of each size's dense
    # non-embedding parameter count (Chinchilla-style designs); exactly one of the two.
    tokens: list[float] = field(default_factory=list)
    tokens_per_param: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    base: dict[str, Any] = field(default_factory=dict)  # run config applied to every run
    method_overrides: dict[str, Any] = field(default_factory=dict)  # method -> run config mapping
    size_overrides: dict[str, Any] = field(default_factory=dict)  # size -> run config mapping
    params: str = "non_embedding"  # N in the law: non_embedding (Kaplan et al.) or total parameters
    fit: FitSettings = field(default_factory=FitSettings)
    budgets: list[float] = field(default_factory=list)  # compute budgets [FLOPs] of the frontier table; [] = auto
    # A study `tune:` block (rankscope.study.tune; protocol shared-dense by default) that every
    # token budget's study runs before training: each budget's lrs are tuned at that budget.
    # Empty: every run keeps its method's default lr.
    tune: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BudgetLevel:
    label: str
    steps: dict[str, int]  # size -> train.steps
    study: Any  # the StudySpec that trains this budget


def load_spec(path: str | Path) -> ScalingSpec:
    return spec_from_dict(load_yaml(path))


def spec_from_dict(data: dict) -> ScalingSpec:
    return dataclass_from_dict(ScalingSpec, data, "scaling")


def validate_spec(spec: ScalingSpec) -> None:
    """Everything that can be checked without building a run, each failure one line."""
    from rankscope.study import REFERENCE_METHOD

    if REFERENCE_METHOD not in spec.methods:
        raise ConfigError(f"scaling: methods must include {REFERENCE_METHOD!r}: the report compares every frontier "
                          "with the dense one (and the study machinery trains against it)")
    if bool(spec.tokens) == bool(spec.tokens_per_param):
        raise ConfigError("scaling: give the token budgets either as tokens: [...] (per run) or as "
                          "tokens_per_param: [...] (multiples of each size's parameters), exactly one of them")
    budgets = spec.tokens or spec.tokens_per_param
    if any(not value > 0 for value in budgets):
        raise ConfigError(f"scaling: token budgets must be positive, got {budgets}")
    if len(set(spec.sizes)) < MIN_SIZES:
        raise ConfigError(f"scaling: {len(set(spec.sizes))} model size(s) {spec.sizes} cannot identify the law's A/N^alpha; "
                          f"list at least {MIN_SIZES} presets under sizes (e.g. {', '.join(FAMILY[:4])})")
    if len(set(budgets)) < MIN_BUDGETS:
        raise ConfigError(f"scaling: {len(set(budgets))} token budget(s) {budgets} cannot identify the law's B/D^beta; "
                          f"list at least {MIN_BUDGETS}")
    if spec.params not in PARAMS_KINDS:
        raise ConfigError(f"scaling.params: {spec.params!r} is not one of {', '.join(PARAMS_KINDS)}")
    for method, overrides in spec.method_overrides.items():
        for section, key in TOKEN_KEYS:
            if key in ((overrides or {}).get(section) or {}):
                raise ConfigError(f"scaling: method_overrides.{method} sets {section}.{key}; every method of a size "
                                  "must see the same tokens, so set it in base or size_overrides")
    unknown = sorted(set(spec.size_overrides) - set(spec.sizes))
    if unknown:
        raise ConfigError(f"scaling: size_overrides names {unknown}, which are not in sizes {spec.sizes}")
    try:
        spec.fit.validate()
    except ScalingFitError as exc:
        raise ConfigError(f"scaling: {exc}") from None


def _tokens_per_step(spec: ScalingSpec, size: str) -> int:
    tree = merge_trees(merge_trees(spec.base, spec.size_overrides.get(size, {})), {"model": {"preset": size}})
    tree.pop("method", None)
    cfg = build_config(tree)
    return cfg.train.batch_size * cfg.data.seq_len


def plan_levels(spec: ScalingSpec) -> list[BudgetLevel]:
    """One study per token budget; every run of every budget validated (through the study
    machinery's `plan_runs`) before anything trains."""
    from rankscope.models import get_preset
    from rankscope.study import StudySpec, plan_runs, study_from_dict

    validate_spec(spec)
    per_step = {size: _tokens_per_step(spec, size) for size in spec.sizes}
    levels = []
    for value in spec.tokens or spec.tokens_per_param:
        label = f"tokens-{value:g}" if spec.tokens else f"tpp-{value:g}"
        steps = {}
        for size in spec.sizes:
            tokens = value if spec.tokens else value * non_embedding_params(get_preset(size))
            steps[size] = round(tokens / per_step[size])
            if steps[size] < 1:
                raise ConfigError(f"scaling: budget {label} gives size {size} {tokens:.4g} tokens, less than one step "
                                  f"of {per_step[size]} tokens; raise the budget or lower train.batch_size / data.seq_len")
        study: StudySpec = study_from_dict({
            "name": f"{spec.name}-{label}",
            "grid": {"methods": list(spec.methods), "presets": list(spec.sizes), "seeds": list(spec.seeds)},
            "base": copy.deepcopy(spec.base),
            "method_overrides": copy.deepcopy(spec.method_overrides),
            "preset_overrides": {size: merge_trees(spec.size_overrides.get(size, {}), {"train": {"steps": steps[size]}})
                                 for size in spec.sizes},
            "eval": {"tasks": []},  # scaling needs the validation loss only
            "tune": copy.deepcopy(spec.tune),
            # A law is fitted per method; the frozen-blocks control has no frontier to fit.
            "controls": [],
        })
        plan_runs(study)
        levels.append(BudgetLevel(label, steps, study))
    return levels


def run_scaling(spec_file: str | Path | None, out_dir: str | Path, spec: ScalingSpec | None = None,
                launch: Any = None) -> dict:
    """Train every budget's study (with the study engine's launcher: local workers, submitit,
    SLURM), collect OUT/scaling.csv, fit and report. With `launch.dry_run` only the plans."""
    from rankscope.scaling.analyze import analyze_table
    from rankscope.study import LaunchOptions, run_study

    spec = spec or load_spec(spec_file)
    levels = plan_levels(spec)
    launch = launch or LaunchOptions()
    out = Path(out_dir)
    stages = ("tune", "train") if spec.tune else ("train",)
    if launch.dry_run:
        plans = [run_study(None, out / "budgets" / level.label, stages, spec=level.study, launch=launch)["plan"]
                 for level in levels]
        return {"plan": "\n".join(f"budget {level.label}:\n{plan}" for level, plan in zip(levels, plans))}
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.yaml").write_text(yaml.safe_dump(config_to_dict(spec), sort_keys=False))
    failed = []
    for index, level in enumerate(levels, 1):
        log.info("scaling [%d/%d] budget %s: steps %s", index, len(levels), level.label, level.steps)
        result = run_study(None, out / "budgets" / level.label, stages, spec=level.study, launch=launch)
        failed += [f"{level.label}/{run}" for run in result["failed"]]
    table = collect_table(spec, levels, out)
    table.to_csv(out / "scaling.csv", index=False)
    analysis = analyze_table(table, out, spec.fit, spec.budgets, title=spec.name, notes=_notes(spec, table, failed))
    return {**analysis, "table": out / "scaling.csv", "failed": failed, "runs": len(table)}


def _notes(spec: ScalingSpec, table: pd.DataFrame, failed: list[str]) -> list[str]:
    counted = ("non-embedding parameters (Kaplan et al. 2020; LoRA's frozen W0 included)" if spec.params == "non_embedding"
               else "all parameters, embedding and head included")
    lrs = table.groupby("method")["lr"].agg(lambda v: ", ".join(f"{x:g}" for x in sorted(set(v))))
    if spec.tune:
        protocol = spec.tune.get("protocol", "shared-dense")
        how = (f"tuned at every budget and size by that budget's tune stage (protocol {protocol}"
               + ("; the embeddings, head and norms at full rank's jointly tuned lr for every method" if protocol == "shared-dense"
                  else "") + "; each budget's tune/chosen.json)")
    else:
        how = "each method's default unless the spec sets one; not tuned on this budget"
    notes = [f"Study `{spec.name}`: {len(table)} runs over sizes {', '.join(spec.sizes)}; N counts {counted}; "
             "loss is each run's final exact validation loss.",
             f"Learning rates ({how}): "
             + "; ".join(f"{method} {lr}" for method, lr in lrs.items())
             + ". The frontiers below inherit them: a method run nearer its best lr for these budgets looks better."]
    if failed:
        notes.append(f"Left out of the fit: {len(failed)} runs that failed ({', '.join(failed)}).")
    return notes


# ---------------------------------------------------------------------------------------------
# the table


def model_counts(cfg, model_cfg) -> dict[str, float]:
    """Parameters (total, non-embedding) and training / inference FLOPs per token of the run's
    model, counted on the meta device (no memory) where the method allows it."""
    import torch

    from rankscope.bench.flops import model_flops
    from rankscope.train.setup import build_run_model

    try:
        with torch.device("meta"):
            model, _ = build_run_model(cfg, model_cfg)
    except (RuntimeError, NotImplementedError):  # a method whose init reads values (ReLoRA)
        model, _ = build_run_model(cfg, model_cfg)
    flops = model_flops(model, 1, cfg.data.seq_len)
    total = sum(p.numel() for p in model.parameters())
    outside = sum(p.numel() for name, p in model.named_parameters() if name.startswith(("embed_tokens.", "lm_head.")))
    return {"params_total": total, "params_non_embedding": total - outside,
            "flops_per_token": flops.training_per_token, "inference_flops_per_token": flops.forward_per_token}


def _lrs(cfg) -> tuple[float, float]:
    """(the method's lr, the embeddings' lr) a run's config resolves to."""
    from rankscope import methods
    from rankscope.train.setup import resolve_optim

    resolved = resolve_optim(cfg, methods.get(cfg.method.name))
    return resolved.lr, resolved.roles.get("embed", {}).get("lr", resolved.lr)


def _run_model_config(run_dir: Path):
    from rankscope.models import LlamaConfig
    from rankscope.train import checkpoint as ckpt

    checkpoints = ckpt.list_checkpoints(run_dir)
    meta = read_json(checkpoints[-1].path / "meta.json", expect=dict)
    return LlamaConfig(**meta["model_config"])


def collect_table(spec: ScalingSpec, levels: list[BudgetLevel], out: Path) -> pd.DataFrame:
    """One row per finished run: method, params (as spec.params counts them), tokens, loss (the
    final exact validation loss), measured FLOPs per token, and where it came from."""
    from rankscope.study import plan_runs

    counts: dict[tuple[str, str], dict] = {}
    rows = []
    for level in levels:
        for run in plan_runs(level.study):
            run_dir = out / "budgets" / level.label / "runs" / run.name
            summary_path = run_dir / "summary.json"
            if not summary_path.is_file():
                log.warning("scaling: %s/%s has no summary.json (failed or unfinished); left out of the fit",
                            level.label, run.name)
                continue
            summary = read_json(summary_path, expect=dict, fix="delete it and train the run again")
            key = (run.method, run.preset)
            # The run's own config: with a tune stage its lrs are the budget's choice, not the plan's.
            cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
            if key not in counts:
                counts[key] = model_counts(cfg, _run_model_config(run_dir))
            lr, embed_lr = _lrs(cfg)
            count = counts[key]
            rows.append({
                "method": run.method, "size": run.preset, "seed": run.seed,
                "params": count["params_non_embedding" if spec.params == "non_embedding" else "params_total"],
                "tokens": summary["tokens"], "loss": summary["val_loss"],
                "flops_per_token": count["flops_per_token"], "inference_flops_per_token": count["inference_flops_per_token"],
                "params_total": count["params_total"], "params_non_embedding": count["params_non_embedding"],
                "steps": summary["steps"], "lr": lr, "embed_lr": embed_lr, "budget": level.label, "run": f"{level.label}/{run.name}",
                "train_seconds": summary.get("train_time"),
            })
    if not rows:
        raise ConfigError(f"scaling: no run under {out / 'budgets'} finished training; see each budget's status.json")
    return pd.DataFrame(rows)


__all__ = ["BudgetLevel", "ScalingSpec", "collect_table", "load_spec", "model_counts", "plan_levels", "run_scaling",
           "spec_from_dict", "validate_spec"]
