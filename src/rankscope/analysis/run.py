"""`rankscope analyze RUN_DIR ... --reference REF [--baseline-references REF2,...]`: every stage on
every selected checkpoint of every run, into the tables of docs/internals.md ("Analysis outputs").

This module only orders the work: it checks the inputs before anything heavy, plans each run's
items stage by stage (:mod:`rankscope.analysis.stages`), computes the ones without a file, and
rebuilds the tables and meta.json from the item files (:mod:`rankscope.analysis.store`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rankscope.analysis.context import (
    AnalysisContext,
    ModelCache,
    RunInfo,
    check_baselines,
    check_inputs,
    inspect_run,
    pairing,
    run_probe,
)
from rankscope.analysis.item_progress import Progress
from rankscope.analysis.probe import Probe
from rankscope.analysis.settings import AnalysisSettings
from rankscope.analysis.stages import STAGES, Stage
from rankscope.analysis.store import Item, write_tables
from rankscope.errors import AnalysisError
from rankscope.io import write_json_atomic

log = logging.getLogger("rankscope.analysis")

PACKED_NOTE = (
    "probe sequences are packed token streams without padding, so every position is real and "
    "mask_padding=true and mask_padding=false give identical numbers"
)


def _stages(run: RunInfo, context: AnalysisContext, progress: Progress | None = None) -> list[Stage]:
    return [stage(run, context, progress) for stage in STAGES if stage.table.name in context.settings.metrics]


def plan_items(run: RunInfo, context: AnalysisContext, steps: Sequence[int]) -> list[Item]:
    """Every item of ``run`` at ``steps`` under the current settings, step by step, in table order."""
    stages = _stages(run, context)
    return [item for step in steps for stage in stages for item in stage.plan(step, steps)]


def analyze_runs(
    run_dirs: Sequence[str | Path],
    reference: str | Path,
    settings: AnalysisSettings | None = None,
    *,
    baseline_references: Sequence[str | Path] = (),
    progress: bool = True,
) -> dict[str, Path]:
    """Analyse every selected checkpoint of every run; returns ``{run name: RUN_DIR/analysis}``.

    ``reference`` is the full-rank run every run is compared with (similarity, IMBH; in a study the
    one of the runs' seed); ``baseline_references`` are full-rank runs of the other seeds: every run
    is compared with each of them too (pairing ``cross-seed``), and a full-rank run's comparisons
    with them are the full-rank seed baseline (each seed pair analysed once, from its lower seed's
    run: :func:`rankscope.analysis.context.pair_owner`).

    Everything that can be checked without computing (runs with checkpoints, requested steps,
    model shapes, the probe set) is checked first, so bad input fails in seconds.
    """
    from rankscope.train.setup import resolve_device

    settings = settings or AnalysisSettings()
    settings.validate()
    if not run_dirs:
        raise AnalysisError("no run folders given; pass at least one RUN_DIR")
    runs = [inspect_run(path) for path in run_dirs]
    reference_run = inspect_run(reference)
    baselines = [inspect_run(path) for path in baseline_references]
    warnings = check_inputs(runs, reference_run, settings) + check_baselines(baselines, reference_run)

    probes: dict[str, tuple[torch.Tensor, str]] = {}
    reference_probe, reference_data = run_probe(reference_run, settings.probe_size, probes)
    for run, role in [(run, "run") for run in runs] + [(b, "baseline reference") for b in baselines]:
        probe, data_fingerprint = run_probe(run, settings.probe_size, probes)
        if probe.shape != reference_probe.shape or not torch.equal(probe, reference_probe):
            raise AnalysisError(
                f"{role} {run.name} and reference {reference_run.name} have different probe sets (data config or "
                "tokenizer differ); analyse runs trained on the same data against references of that data"
            )
        if data_fingerprint != reference_data:
            warnings.append(f"{role} {run.name} was trained on other data than the reference (same probe set)")
    for message in warnings:
        log.warning(message)

    device = resolve_device(settings.device)
    probe = Probe(reference_probe, settings.batch_size, device, settings.mask_padding, settings.loss_average)
    context = AnalysisContext(settings, reference_run, runs, probe, ModelCache(device, size=4), progress, warnings, baselines)
    for run in runs:
        elsewhere = context.analysed_elsewhere(run)
        if elsewhere:
            log.info("%s: its seed pairs with %s are analysed from their side (the lower seed's run)", run.name, ", ".join(elsewhere))
    return {run.name: _analyze_one(run, context) for run in runs}


def _analyze_one(run: RunInfo, context: AnalysisContext) -> Path:
    settings = context.settings
    analysis_dir = run.path / "analysis"
    analysis_dir.mkdir(parents=True, exist_ok=True)
    steps = list(settings.steps) if settings.steps is not None else run.steps
    items = plan_items(run, context, steps)
    pending = [item for item in items if not item.path(analysis_dir).is_file()]
    log.info("%s: %d of %d analysis items to compute (%d checkpoints)", run.name, len(pending), len(items), len(steps))
    with Progress(run.name, float(len(pending)), enabled=context.show_progress) as bar:
        stages = {stage.table.name: stage for stage in _stages(run, context, bar)}
        for item in pending:
            started = time.perf_counter()
            before = bar.done
            payload = stages[item.table].compute(item)
            bar.advance(max(0.0, 1.0 - (bar.done - before)))  # top up to exactly one unit per item
            payload.update(key=item.key, family=item.family, step=item.step, run=run.name,
                           seconds=time.perf_counter() - started)
            write_json_atomic(item.path(analysis_dir), payload)
            bar.item_done(f"step {item.step} {item.family}", time.perf_counter() - started)
    _write_meta(run, context, analysis_dir)
    return analysis_dir


def _write_meta(run: RunInfo, context: AnalysisContext, analysis_dir: Path) -> dict[str, Any]:
    """Rebuild every table from the item files and write meta.json."""
    s = context.settings
    items = plan_items(run, context, run.steps)  # every checkpoint: earlier calls may have done other steps
    keys = {"run": run.name, "method": run.method, "preset": run.preset, "seed": run.seed}
    recorded = write_tables(analysis_dir, keys, items, [stage.table for stage in STAGES], s.metrics)
    meta: dict[str, Any] = {
        "run": run.name, "run_dir": str(run.path.resolve()), "method": run.method, "preset": run.preset, "seed": run.seed,
        "reference_run": context.reference.name, "reference_dir": str(context.reference.path.resolve()),
        "reference_method": context.reference.method,
        "baseline_references": [b.name for b in context.baselines],
        "comparisons": [{"run": other.name, "method": other.method, "seed": other.seed, "pairing": pairing(run, other)}
                        for other in context.references(run)],
        "seed_pairs_analysed_elsewhere": context.analysed_elsewhere(run),
        "settings": s.to_dict(),
        "probe": {
            "fingerprint": context.probe.fingerprint, "sequences": len(context.probe),
            "seq_len": int(context.probe.sequences.shape[1]), "tokens": context.probe.tokens,
            "data_fingerprint": run.data_fingerprint, "packed": True,
        },
        "mask_padding": s.mask_padding, "mask_padding_note": PACKED_NOTE,
        "loss_average": s.loss_average,
    }
    for stage in STAGES:
        for key, value in stage.describe(run, context).items():
            if isinstance(value, dict) and isinstance(meta.get(key), dict):
                meta[key].update(value)
            else:
                meta[key] = value
    meta.update(warnings=context.warnings, **recorded)
    write_json_atomic(analysis_dir / "meta.json", meta)
    return meta
