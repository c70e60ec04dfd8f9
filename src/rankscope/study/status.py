"""What a study folder records about its work, so that a stopped driver picks up where it was.

- `status.json`: per run and stage, done or failed (with the error and the job's log); written by
  the driver only, read by the report.
- `jobs.json`: per job, the launcher and job id it was submitted under, so that a new driver
  follows jobs that are still queued or running instead of submitting them twice.
- `jobs/<stage>/<name>.json`: the job's own outcome (running, done, failed, preempted), written
  atomically by the process that runs the job, whatever launcher started it.
- `logs/<stage>/<name>.log`: everything the job logged, appended over attempts.

All are written with rankscope.io.write_json_atomic. A damaged status.json or jobs.json stops the
driver with a one-line error (read as empty, it would re-submit jobs that are queued or done);
a damaged outcome file is what a job left behind, and reads as "no outcome" with a warning.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from rankscope.errors import RankscopeError
from rankscope.io import read_json, write_json_atomic

# What to do about a damaged status.json / jobs.json (finished jobs are found again from their
# outcome files and results on disk; jobs.json's queued ones would be submitted again).
STATUS_FIX = "delete it and run the study again (finished jobs are skipped and recorded anew)"
JOBS_FIX = ("delete it once no job of this study is queued or running (the jobs it lists would be submitted "
            "again), then run the study again")


def error_line(exc: BaseException) -> str:
    if isinstance(exc, RankscopeError):
        return str(exc)
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


class StudyStatus:
    """`status.json`: per run and stage, done or failed (with the error)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict[str, Any]] = read_json(path, missing={}, expect=dict, fix=STATUS_FIX)

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
        """The job's outcome; None when there is none. A damaged one (left by a job killed on a
        file system without atomic renames, or edited) counts as none, with a warning: the
        driver then records the job as failed or runs it again, which rewrites the file."""
        return read_json(self.outcome, on_damage="none", expect=dict, fix="the job is run again")

    def write_outcome(self, outcome: dict) -> None:
        write_json_atomic(self.outcome, outcome)


class JobRecords:
    """`jobs.json`: {job key: {launcher, job_id, ...}} of every job submitted to a launcher."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict[str, Any]] = read_json(path, missing={}, expect=dict, fix=JOBS_FIX)

    def get(self, key: str) -> dict | None:
        return self.data.get(key)

    def set(self, key: str, record: dict) -> None:
        self.data[key] = record
        write_json_atomic(self.path, self.data)
