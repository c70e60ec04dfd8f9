"""Resumable analysis work: items, their files, and the tables rebuilt from them.

Work is cut into **items**, one per (checkpoint step, item family, settings hash), e.g.
``landscape:random:all`` at step 200. Each finished item is written atomically to
``analysis/items/step_XXXXXX/<family>-<hash>.json``; a re-run skips every item whose file
exists, and the tables are always rebuilt from the item files (:func:`write_tables`), so an
interrupted analysis resumes where it stopped and ends with the same tables as a straight one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rankscope.io import read_json

KEY_COLUMNS = ["run", "method", "preset", "seed", "step"]


@dataclass
class Item:
    step: int
    family: str  # landscape:<set>:<scope> | interpolation:ccbh | interpolation:imbh:<other> | spectral | similarity:<reference>
    digest: str
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"step_{self.step:06d}/{self.family}/{self.digest}"

    def path(self, analysis_dir: Path) -> Path:
        safe = self.family.replace(":", "__").replace("/", "_")
        return analysis_dir / "items" / f"step_{self.step:06d}" / f"{safe}-{self.digest}.json"

    @property
    def table(self) -> str:
        return self.family.split(":")[0]


def write_csv_atomic(frame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def write_npz_atomic(arrays: Mapping[str, np.ndarray], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


@dataclass
class TableSpec:
    """How one family's items become files: its CSV columns and its npz file (if it keeps arrays)."""

    name: str
    columns: list[str]
    arrays_file: str | None = None
    integer_columns: tuple[str, ...] = ()


def write_tables(
    analysis_dir: Path, keys: Mapping[str, Any], items: Sequence[Item], tables: Sequence[TableSpec], selected: Sequence[str],
) -> dict[str, Any]:
    """Rebuild the selected tables and npz files from the finished item files; returns what the
    items recorded besides rows (finished keys, not-applicable reasons, base losses, notes, and
    the seconds spent per table)."""
    import pandas as pd

    rows: dict[str, list[dict[str, Any]]] = {spec.name: [] for spec in tables}
    arrays: dict[str, dict[str, np.ndarray]] = {spec.name: {} for spec in tables if spec.arrays_file}
    finished, not_applicable, base_losses, notes = [], {}, {}, {}
    seconds: dict[str, float] = {}
    for item in items:
        path = item.path(analysis_dir)
        if not path.is_file():
            continue
        payload = read_json(path, expect=dict, fix="delete it; the next analysis computes that item again")
        finished.append(item.key)
        for row in payload["rows"]:
            rows[item.table].append({**keys, "step": item.step, **row})
        if item.table in arrays:
            for name, values in payload["arrays"].items():
                arrays[item.table][name] = np.asarray(values, dtype=np.float64)
        if payload.get("not_applicable"):
            not_applicable[item.family] = payload["not_applicable"]
        if "base_loss" in payload:
            base_losses[str(item.step)] = payload["base_loss"]
        if payload.get("notes"):
            notes[item.key] = payload["notes"]
        seconds[item.table] = seconds.get(item.table, 0.0) + float(payload.get("seconds", 0.0))

    for spec in tables:
        if spec.name not in selected:
            continue
        frame = pd.DataFrame(rows[spec.name], columns=spec.columns)
        for column in spec.integer_columns:
            frame[column] = frame[column].astype("Int64")
        write_csv_atomic(frame, analysis_dir / f"{spec.name}.csv")
        if spec.arrays_file:
            write_npz_atomic(arrays[spec.name], analysis_dir / spec.arrays_file)
    return {"base_losses": base_losses, "not_applicable": not_applicable, "notes": notes, "finished": finished,
            "cost_seconds": seconds}
