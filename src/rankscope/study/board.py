"""One live view of a whole study: every run, every stage, as the jobs move.

On a terminal it is a rich table redrawn in place (runs as rows, stages as columns, the step and
loss of running training jobs read from their metrics.jsonl); anywhere else it prints one log line
per change of state and, every minute, one line on how far the running jobs are.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from rankscope.study.jobs import Job

log = logging.getLogger("rankscope.study")

_STYLE = {"queued": "dim", "running": "cyan", "done": "green", "failed": "bold red", "interrupted": "yellow"}
PLAIN_SUMMARY_EVERY_S = 60.0


class StudyBoard:
    def __init__(self, title: str, live: bool | None = None):
        self.title = title
        self.live_enabled = sys.stderr.isatty() if live is None else live
        self.cells: dict[str, dict[str, tuple[str, str]]] = {}  # run -> stage -> (state, detail)
        self.stages: list[str] = []
        self.jobs: dict[tuple[str, str], tuple[Job, str]] = {}  # (stage, name) -> (job, state)
        self.started = time.monotonic()
        self._live: Any = None
        self._last_summary = time.monotonic()

    def __enter__(self) -> StudyBoard:
        if self.live_enabled:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._render(), console=Console(stderr=True), refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)
            self._live = None

    def set(self, job: Job, state: str, detail: str = "") -> None:
        if job.stage not in self.stages:
            self.stages.append(job.stage)
        previous = self.jobs.get((job.stage, job.name), (job, None))[1]
        self.jobs[(job.stage, job.name)] = (job, state)
        for run in job.runs:
            self.cells.setdefault(run, {})[job.stage] = (state, detail)
        if self._live is None and state != previous and state != "queued":
            counts = self._counts(job.stage)
            line = f"[{job.stage} {counts['done'] + counts['failed']}/{sum(counts.values())}] {job.name}: {state}"
            (log.error if state == "failed" else log.info)(line + (f" ({detail})" if detail else ""))
        self.refresh()

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())
        elif time.monotonic() - self._last_summary >= PLAIN_SUMMARY_EVERY_S:
            self._last_summary = time.monotonic()
            for stage in self.stages:
                running = [(job, job.progress()) for job, state in self.jobs.values() if job.stage == stage and state == "running"]
                if running:
                    counts = self._counts(stage)
                    where = ", ".join(f"{job.name} {progress}" if progress else job.name for job, progress in running)
                    log.info("[%s] %d done, %d failed, %d running: %s, %d queued", stage, counts["done"],
                             counts["failed"], len(running), where, counts["queued"])

    def _counts(self, stage: str) -> dict[str, int]:
        counts = {"queued": 0, "running": 0, "done": 0, "failed": 0, "interrupted": 0}
        for job, state in self.jobs.values():
            if job.stage == stage:
                counts[state] = counts.get(state, 0) + 1
        return counts

    def _render(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        elapsed = time.monotonic() - self.started
        parts = []
        for stage in self.stages:
            counts = self._counts(stage)
            parts.append(f"{stage} {counts['done']}/{sum(counts.values())} done"
                         + (f", {counts['failed']} failed" if counts["failed"] else ""))
        header = Text(f"{self.title}  {int(elapsed // 60):d}:{int(elapsed % 60):02d}  " + "  |  ".join(parts), style="bold")
        table = Table(box=None, pad_edge=False)
        table.add_column("run")
        for stage in self.stages:
            table.add_column(stage)
        progress = {(job.stage, run): job.progress() for job, state in self.jobs.values() if state == "running" for run in job.runs}
        for run, stages in self.cells.items():
            row = [Text(run)]
            for stage in self.stages:
                state, detail = stages.get(stage, ("", ""))
                live = progress.get((stage, run))
                if state == "running" and live:
                    text = f"running {live}"
                elif state == "failed" and detail:
                    text = f"failed: {detail}"
                else:
                    text = f"{state} ({detail})" if state == "done" and detail else state
                row.append(Text(text[:80], style=_STYLE.get(state, "")))
            table.add_row(*row)
        return Group(header, table)
