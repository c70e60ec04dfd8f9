"""What a study folder records about its work, so that a stopped driver picks up where it was.

- `status.json`: per run and stage, done or failed (with the error and the job's log); written by
  the driver only, read by the report.
- `jobs.json`: per job, the launcher and job id it was submitted under, so that a new driver
  follows jobs that are still queued or running instead of submitting them twice.
- `jobs/<stage>/<name>.json`: the job's own outcome (running, done, failed, preempted), written
  atomically by the process that runs the job, whatever launcher started it.
- `logs/<stage>/<name>.log`: everything the job logged, appended over attempts.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any

from rankscope.errors import RankscopeError


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=lambda v: None))
    tmp.replace(path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def error_line(exc: BaseException) -> str:
    if isinstance(exc, RankscopeError):
        return str(exc)
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


class StudyStatus:
    """`status.json`: per run and stage, done or failed (with the error)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict[str, Any]] = (read_json(path) or {}) if path.is_file() else {}

    def set(self, run: str, stage: str, state: str, error: str | None = None, log: str | None = None) -> None:
        entry = self.data.setdefault(run, {})
        entry[stage] = {"state": state, **({"error": error} if error else {}), **({"log": log} if log else {})}
        write_json_atomic(self.path, self.data)

    def failed(self, run: str) -> bool:
        return any(v.get("state") == "failed" for v in self.data.get(run, {}).values())

    def state(self, run: str, stage: str) -> str | None:
        return self.data.get(run, {}).get(stage, {}).get("state")


class JobFiles:
    """Where one job's outcome, lock and log live in the study folder."""

    def __init__(self, study_dir: Path, stage: str, name: str):
        self.key = f"{stage}/{name}"
        self.outcome = study_dir / "jobs" / stage / f"{name}.json"
        self.lock = study_dir / "jobs" / stage / f"{name}.lock"
        self.log = study_dir / "logs" / stage / f"{name}.log"

    def read_outcome(self) -> dict | None:
        outcome = read_json(self.outcome)
        return outcome if isinstance(outcome, dict) else None

    def write_outcome(self, outcome: dict) -> None:
        write_json_atomic(self.outcome, outcome)


class JobRecords:
    """`jobs.json`: {job key: {launcher, job_id, ...}} of every job submitted to a launcher."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict[str, Any]] = (read_json(path) or {}) if path.is_file() else {}

    def get(self, key: str) -> dict | None:
        return self.data.get(key)

    def set(self, key: str, record: dict) -> None:
        self.data[key] = record
        write_json_atomic(self.path, self.data)
