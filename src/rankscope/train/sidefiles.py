"""A run's side files (metrics.jsonl, initial_eval.json, summary.json), written so a crash cannot
block the next start.

JSON files are written whole to a temporary name, synced and renamed into place, so a crash
leaves the old file or the new one, never half of one. The metrics log is append-only, one
`write` per line: a crash can cut off at most its last line, which the next start drops with a
warning. Any other damage (an edited or bit-flipped file) is a one-line error naming the file
and what to do about it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from rankscope import io as rsio
from rankscope.errors import CheckpointError

log = logging.getLogger("rankscope.train")

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
INITIAL_EVAL_FILE = "initial_eval.json"


def write_json(path: Path, data: Any) -> None:
    """Replace `path` by `data` as strict JSON in one atomic rename (synced first)."""
    rsio.write_json_atomic(path, data)


def read_json(path: Path, fix: str) -> Any:
    """`path` parsed as JSON; a damaged file is a CheckpointError that says `fix`."""
    return rsio.read_json(path, fix=fix, error=CheckpointError)


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one record as one line of strict JSON (non-finite numbers as null), in one write."""
    line = rsio.dumps(record) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)


def _parse_record(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int)
    return record if ok else None


def _metrics_records(path: Path) -> list[tuple[bytes, dict]]:
    """The log's (line, record) pairs. A partial last line (a crash while appending it) is dropped
    with a warning; a damaged line before the end cannot come from a crash and is an error."""
    lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        record = _parse_record(line)
        if record is not None:
            records.append((line, record))
        elif number == len(lines):
            log.warning("%s: dropped its last line, cut off by an interrupted write", path)
        else:
            raise CheckpointError(
                f"{path} line {number} is damaged (not a metrics record); delete that line, or the file "
                "(the run then keeps no log of the steps so far), and re-run"
            )
    return records


def _rewrite_lines(path: Path, lines: list[bytes]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(b"".join(line + b"\n" for line in lines))
    os.replace(tmp, path)


def trim_metrics(path: Path, keep_through: int) -> None:
    """Keep the log's records up to step `keep_through` (a resume point; -1 keeps none)."""
    if path.is_file():
        _rewrite_lines(path, [line for line, record in _metrics_records(path) if record["step"] <= keep_through])


def check_run_files(run_dir: Path) -> None:
    """Before a run starts or resumes: repair a cut-off last metrics line, refuse other damage."""
    for name, fix in (
        (SUMMARY_FILE, "delete it and re-run: the final checkpoint is evaluated again and the summary rewritten"),
        (INITIAL_EVAL_FILE, "delete it to go on (the summary then lacks the initial loss)"),
    ):
        path = run_dir / name
        if path.is_file():
            data = read_json(path, fix)
            if not isinstance(data, dict) or (name == INITIAL_EVAL_FILE and not {"loss", "ppl"} <= set(data)):
                raise CheckpointError(f"{path} is damaged (not the expected record); {fix}")
    path = run_dir / METRICS_FILE
    if path.is_file():
        lines = [line for line, _ in _metrics_records(path)]
        if path.read_bytes() != b"".join(line + b"\n" for line in lines):
            _rewrite_lines(path, lines)
