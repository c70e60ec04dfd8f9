"""Progress of an analysis, item by item: a rich bar with ETA on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("rankscope.analysis")


class Progress:
    """Counts work in units (one per item, fractions inside long items)."""

    def __init__(self, label: str, total: float, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.done = 0.0
        self._rich = None
        self._task = None
        self._started = time.perf_counter()

    def __enter__(self) -> Progress:
        if self.enabled and sys.stderr.isatty() and self.total > 0:
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn(f"[bold]analyze {self.label}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False,
            )
            self._rich.__enter__()
            self._task = self._rich.add_task("analyze", total=self.total, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def advance(self, amount: float, info: str = "") -> None:
        self.done += amount
        if self._rich is not None:
            self._rich.update(self._task, advance=amount, info=info)

    def item_done(self, info: str, seconds: float) -> None:
        if self._rich is None and self.enabled:
            log.info("%s: %s done in %.1f s (%.0f%%)", self.label, info, seconds, 100.0 * self.done / max(self.total, 1e-9))
