"""Read a study folder into pandas tables.

Everything here follows the file formats of docs/internals.md ("Analysis outputs", "Study
layout") and the trainer's run folder (config.yaml, metrics.jsonl, summary.json, eval/). A study
that is still running, or whose runs failed, is read as far as its files go: missing files give
missing values (NaN) and a note in `Study.notes`, never an exception. Only a folder that is not a
study at all raises `ReportError`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rankscope.config import REFERENCE_METHOD
from rankscope.errors import RankscopeError
from rankscope.io import read_json

log = logging.getLogger("rankscope.report")

KEY_COLUMNS = ["run", "method", "preset", "seed", "step"]
ANALYSIS_FAMILIES = ("landscape", "interpolation", "spectral", "similarity", "intruder", "landscape2d", "hessian")
CONTROL_SUFFIX = " (control)"

# Run folders are named <method>-<preset>-s<seed>; used when config.yaml is missing (a run that
# failed before the trainer wrote anything).
_RUN_NAME = re.compile(r"^(?P<method>.+)-(?P<preset>[^-]+)-s(?P<seed>\d+)$")
_STEP_FILE = re.compile(r"^step_(\d+)\.json$")


class ReportError(RankscopeError):
    """The folder given to `rankscope report` is not a study (or not readable as one)."""


@dataclass
class Study:
    """Everything the report needs, read once from disk."""

    study_dir: Path
    runs: pd.DataFrame                      # one row per run (see `read_runs`)
    tables: dict[str, pd.DataFrame]         # analysis family -> concatenated tidy table
    downstream: pd.DataFrame                # run keys + task, acc, acc_stderr, n (final step)
    training: pd.DataFrame                  # run keys + step, loss, val_loss (metrics.jsonl)
    predictor: pd.DataFrame | None          # STUDY_DIR/predictor.csv
    notes: list[str] = field(default_factory=list)
    analysis_meta: dict[str, dict] = field(default_factory=dict)  # run -> analysis/meta.json

    def run_dir(self, run: str) -> Path:
        return self.study_dir / "runs" / run

    def presets(self) -> list[str]:
        return sorted_presets(self.runs["preset"].dropna().unique()) if len(self.runs) else []


# --- small readers -----------------------------------------------------------------------------


def _read_json(path: Path, notes: list[str]) -> Any:
    """A study file for the report: a report of a study still being written must build, so a
    damaged file is left out and said so in the report's Missing data (never read as absent)."""
    return read_json(path, on_damage="none", notes=notes, fix="left out of this report")


def _read_yaml(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        return None
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        notes.append(f"{path}: unreadable YAML ({exc}); ignored")
        return None


def _number(value: Any) -> float:
    """A float, NaN for anything that is not a finite-or-infinite number (None, strings, bools)."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def preset_size(preset: str) -> float:
    """Sort key that puts presets in model-size order: tiny < 20m < 60m < ... < 1b < 7b."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([mMbB])", str(preset))
    if match:
        return float(match.group(1)) * (1e3 if match.group(2).lower() == "b" else 1.0)
    return -1.0 if str(preset) == "tiny" else math.inf


def sorted_presets(presets) -> list[str]:
    return sorted((str(p) for p in presets), key=lambda p: (preset_size(p), p))


@functools.cache
def is_control(method: str) -> bool:
    """Whether `method` names a control (`frozen`: a reference row, never ranked or tested) rather
    than a method. A name this installation does not know is a method: the report of an old or
    foreign study must still build."""
    from rankscope import methods

    try:
        return methods.is_control(str(method))
    except RankscopeError:
        return False


def method_label(method: str) -> str:
    """A method's name as tables show it: controls marked, so no reader takes them for a method."""
    return f"{method}{CONTROL_SUFFIX}" if is_control(method) else str(method)


def sorted_methods(methods) -> list[str]:
    """The reference method (full) first, the others alphabetically, controls last (reference
    rows, after the methods they are a yardstick for): the order of every table."""
    unique = sorted({str(m) for m in methods})
    others = [m for m in unique if m != REFERENCE_METHOD]
    return (([REFERENCE_METHOD] if REFERENCE_METHOD in unique else []) + [m for m in others if not is_control(m)]
            + [m for m in others if is_control(m)])


def finite(series: pd.Series) -> pd.Series:
    """Boolean mask of the finite numbers in a column of any dtype (an empty or object column
    read from disk included)."""
    values = pd.to_numeric(series, errors="coerce").astype(float)
    return pd.Series(np.isfinite(values.to_numpy()), index=series.index)


def as_bool(value: Any) -> bool:
    """CSV round trips turn bools into 'True' / 'true' / 1; read them all back."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return bool(value)


# --- runs ------------------------------------------------------------------------------------------


def _identity(run: str, config: dict | None, summary: dict | None) -> dict[str, Any]:
    """method, preset, seed of a run: summary first, then config.yaml, then the folder name."""
    method = preset = seed = None
    if summary:
        method, preset, seed = summary.get("method"), summary.get("preset"), summary.get("seed")
    if config:
        method = method or (config.get("method") or {}).get("name")
        preset = preset or (config.get("model") or {}).get("preset")
        seed = seed if seed is not None else (config.get("train") or {}).get("seed")
    match = _RUN_NAME.match(run)
    if match:
        method = method or match.group("method")
        preset = preset or match.group("preset")
        seed = seed if seed is not None else int(match.group("seed"))
    return {"method": method, "preset": preset, "seed": int(seed) if seed is not None else None}


def _run_status(entry: Any) -> tuple[str | None, str | None]:
    """(status, failure reason) of one status.json entry.

    Two shapes are read: the documented `{stage: done | failed, error}` and the study runner's
    per-stage `{train: {state, error?}, analyze: {...}, ...}`. A run is `failed` when any stage
    failed (the reason names the stage), `done` when every recorded stage is done.
    """
    if not isinstance(entry, dict) or not entry:
        return None, None
    if "stage" in entry or "state" in entry:
        state = entry.get("stage") or entry.get("state")
        return (str(state) if state else None), (str(entry["error"]) if entry.get("error") else None)
    failures, states = [], []
    for stage_name, value in entry.items():
        if not isinstance(value, dict):
            continue
        state = value.get("state") or value.get("stage")
        states.append(state)
        if state == "failed":
            failures.append(f"{stage_name}: {value.get('error') or 'no reason recorded'}")
    if failures:
        return "failed", "; ".join(failures)
    if states and all(s == "done" for s in states):
        return "done", None
    return (str(states[-1]) if states else None), None


def _eval_files(run_dir: Path) -> dict[int, Path]:
    folder = run_dir / "eval"
    if not folder.is_dir():
        return {}
    files = {}
    for path in folder.iterdir():
        match = _STEP_FILE.match(path.name)
        if match:
            files[int(match.group(1))] = path
    return files


def _final_eval(run_dir: Path, final_step: int | None, notes: list[str]) -> tuple[int | None, dict | None]:
    """The downstream results of the final checkpoint (the one the study evaluates)."""
    files = _eval_files(run_dir)
    if not files:
        return None, None
    step = final_step if final_step is not None else max(files)
    if step not in files:
        notes.append(f"{run_dir.name}: no eval/step_{step:06d}.json for the final step "
                     f"(have steps {', '.join(map(str, sorted(files)))}); downstream left empty")
        return None, None
    return step, _read_json(files[step], notes)


def read_runs(study_dir: Path, notes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per run, and the long table of its final-step downstream accuracies per task.

    Runs are the union of the folders under runs/ and the entries of status.json (a run can
    fail before its folder exists). `status` is status.json's stage when present, otherwise
    `done` for a run with a summary.json and `incomplete` without one.
    """
    runs_dir = study_dir / "runs"
    status = _read_json(study_dir / "status.json", notes) or {}
    if not isinstance(status, dict):
        notes.append("status.json is not a {run: {...}} mapping; ignored")
        status = {}
    names = set(status)
    if runs_dir.is_dir():
        names |= {p.name for p in runs_dir.iterdir() if p.is_dir()}

    rows, downstream_rows = [], []
    for run in sorted(names):
        run_dir = runs_dir / run
        summary = _read_json(run_dir / "summary.json", notes)
        config = _read_yaml(run_dir / "config.yaml", notes)
        stage, error = _run_status(status.get(run))
        identity = _identity(run, config, summary)
        memory = (summary or {}).get("memory") or {}
        final_step = (summary or {}).get("steps")
        if final_step is None and config:
            final_step = (config.get("train") or {}).get("steps")
        eval_step, evaluation = _final_eval(run_dir, int(final_step) if final_step is not None else None, notes)
        stage = stage or ("done" if summary else "incomplete")
        row = {
            "run": run, **identity,
            "status": stage,
            "failure_reason": (str(error) if error else ("" if stage != "failed" else "no reason recorded")),
            "steps": _number(final_step),
            "tokens": _number((summary or {}).get("tokens")),
            "val_loss": _number((summary or {}).get("val_loss")),
            "val_ppl": _number((summary or {}).get("val_ppl")),
            "val_tokens": _number((summary or {}).get("val_tokens")),
            "params": _number((summary or {}).get("params")),
            "trainable_params": _number((summary or {}).get("trainable_params")),
            "optimizer_state_bytes": _number(memory.get("optimizer_state_bytes")),
            "estimated_memory_bytes": _number(memory.get("estimated_memory_bytes")),
            "tokens_per_sec": _number((summary or {}).get("tokens_per_sec")),
            "wall_time": _number((summary or {}).get("wall_time")),
            "downstream_acc": _number((evaluation or {}).get("mean_acc")),
            "downstream_step": eval_step,
        }
        if row["status"] != "failed" and summary is None:
            notes.append(f"{run}: no summary.json (status {row['status']}); its training numbers are empty")
        rows.append(row)
        for task, values in ((evaluation or {}).get("tasks") or {}).items():
            downstream_rows.append({
                "run": run, **identity, "step": eval_step, "task": task,
                "acc": _number((values or {}).get("acc")), "acc_stderr": _number((values or {}).get("acc_stderr")),
                "n": _number((values or {}).get("n")),
            })
    runs = pd.DataFrame(rows, columns=[
        "run", "method", "preset", "seed", "status", "failure_reason", "steps", "tokens", "val_loss", "val_ppl",
        "val_tokens", "params", "trainable_params", "optimizer_state_bytes", "estimated_memory_bytes",
        "tokens_per_sec", "wall_time", "downstream_acc", "downstream_step",
    ])
    downstream = pd.DataFrame(downstream_rows, columns=KEY_COLUMNS + ["task", "acc", "acc_stderr", "n"])
    return runs, downstream


# --- per-run files -------------------------------------------------------------------------------


def _analysis_csv(run_dir: Path, family: str) -> Path | None:
    for candidate in (run_dir / "analysis" / f"{family}.csv", run_dir / "analysis" / family / f"{family}.csv"):
        if candidate.is_file():
            return candidate
    return None


def read_analysis_tables(study_dir: Path, runs: pd.DataFrame, notes: list[str]) -> dict[str, pd.DataFrame]:
    """The per-run analysis CSVs of every family, concatenated (keys filled from the run row
    where a CSV lacks them)."""
    tables: dict[str, pd.DataFrame] = {}
    for family in ANALYSIS_FAMILIES:
        parts = []
        for run_row in runs.itertuples(index=False):
            path = _analysis_csv(study_dir / "runs" / run_row.run, family)
            if path is None:
                continue
            try:
                frame = pd.read_csv(path)
            except (OSError, ValueError) as exc:
                notes.append(f"{path}: unreadable CSV ({exc}); ignored")
                continue
            for key in ("run", "method", "preset", "seed"):
                if key not in frame.columns:
                    frame[key] = getattr(run_row, key)
            parts.append(frame)
        if parts:
            table = pd.concat(parts, ignore_index=True)
            if "value" in table.columns:
                table["value"] = pd.to_numeric(table["value"], errors="coerce")
            if "applicable" in table.columns:
                table["applicable"] = table["applicable"].map(as_bool)
            for column in ("run", "method", "preset"):
                table[column] = table[column].astype(str)
            tables[family] = table
    return tables


def read_training_logs(study_dir: Path, runs: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """metrics.jsonl of every run as one long table (step, loss, val_loss, ...)."""
    records = []
    for run_row in runs.itertuples(index=False):
        path = study_dir / "runs" / run_row.run / "metrics.jsonl"
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                # A run killed mid-write leaves a torn last line; the rest of the log is fine.
                notes.append(f"{path}: line {number} is not JSON; skipped")
                continue
            records.append({"run": run_row.run, "method": run_row.method, "preset": run_row.preset,
                            "seed": run_row.seed, "step": record.get("step"),
                            "loss": _number(record.get("loss")), "val_loss": _number(record.get("val_loss")),
                            "lr": _number(record.get("lr"))})
    return pd.DataFrame(records, columns=KEY_COLUMNS + ["loss", "val_loss", "lr"])


def load_profiles(run_dir: Path, filename: str = "landscape_profiles.npz") -> dict[str, np.ndarray]:
    """An npz file of one run's analysis (landscape_profiles.npz by default) as a dict (empty when
    absent or unreadable)."""
    path = run_dir / "analysis" / filename
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); profiles of this run skipped", path, exc)
        return {}


def load_surfaces(run_dir: Path) -> dict[str, np.ndarray]:
    """landscape2d_surfaces.npz of one run: ``<pair>/<scope>/step_XXXXXX`` -> (y, x) surface, ``axes/<pair>``."""
    return load_profiles(run_dir, "landscape2d_surfaces.npz")


def load_analysis_meta(study_dir: Path, runs: pd.DataFrame) -> dict[str, dict]:
    """Each run's analysis/meta.json (its settings: which loss average, grids, definitions)."""
    metas = {}
    for run in runs["run"]:
        path = study_dir / "runs" / str(run) / "analysis" / "meta.json"
        if path.is_file():
            try:
                metas[str(run)] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
    return metas


def applicable_mask(table: pd.DataFrame) -> pd.Series:
    """Rows marked applicable (all rows when the table has no `applicable` column)."""
    if "applicable" not in table.columns:
        return pd.Series(True, index=table.index)
    return table["applicable"].map(as_bool).astype(bool)


def spectral_means(spectral: pd.DataFrame) -> pd.DataFrame:
    """The mean-over-matrices rows (matrix == 'mean'); computed from per-matrix rows for runs
    whose table has none (pooled update rows are totals, not matrices, and stay out)."""
    is_mean = spectral["matrix"].astype(str) == "mean"
    have_mean = set(spectral.loc[is_mean, "run"])
    computed = spectral[~is_mean & ~spectral["matrix"].astype(str).eq("pooled") & ~spectral["run"].isin(have_mean)]
    keys = ["run", "method", "preset", "seed", "step", "target", "metric"]
    if not computed.empty:
        computed = computed.groupby(keys, as_index=False)["value"].mean()
        computed["matrix"] = "mean"
    return pd.concat([spectral[is_mean], computed], ignore_index=True)


# --- entry point ---------------------------------------------------------------------------------------


def load_study(study_dir: str | Path) -> Study:
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise ReportError(f"study folder {study_dir} does not exist; pass the --out folder of `rankscope study`")
    if not (study_dir / "runs").is_dir() and not (study_dir / "status.json").is_file():
        raise ReportError(f"{study_dir} has neither runs/ nor status.json, so it is not a study folder; "
                          "pass the --out folder of `rankscope study`")
    notes: list[str] = []
    runs, downstream = read_runs(study_dir, notes)
    tables = read_analysis_tables(study_dir, runs, notes)
    training = read_training_logs(study_dir, runs, notes)
    predictor = None
    predictor_path = study_dir / "predictor.csv"
    if predictor_path.is_file():
        try:
            predictor = pd.read_csv(predictor_path)
        except (OSError, ValueError) as exc:
            notes.append(f"{predictor_path}: unreadable CSV ({exc}); predictor figure skipped")
    return Study(study_dir=study_dir, runs=runs, tables=tables, downstream=downstream,
                 training=training, predictor=predictor, notes=notes, analysis_meta=load_analysis_meta(study_dir, runs))


__all__ = [
    "ANALYSIS_FAMILIES", "CONTROL_SUFFIX", "KEY_COLUMNS", "REFERENCE_METHOD", "ReportError", "Study", "applicable_mask",
    "as_bool", "finite", "is_control", "load_analysis_meta", "load_profiles", "load_surfaces",
    "load_study", "method_label", "preset_size", "read_analysis_tables", "read_runs", "read_training_logs",
    "sorted_methods", "sorted_presets", "spectral_means",
]
