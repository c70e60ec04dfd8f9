"""Progress of training, step by step: a rich bar on a terminal, plain log lines everywhere else."""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

log = logging.getLogger("rankscope.train")


class ProgressLog:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, log_every: int = 10):
        self.total = total
        self.start = start
        self.enabled = enabled
        self.log_every = log_every
        self._rich = None
        self._task = None

    def __enter__(self) -> ProgressLog:
        if self.enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._rich = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"), transient=False,
            )
            self._rich.__enter__()
            self._task = self._rich.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def update(self, step: int, record: dict[str, Any], tokens_per_sec: float) -> None:
        if not self.enabled:
            return
        loss = record["loss"]
        ppl = math.exp(min(loss, 50)) if math.isfinite(loss) else float("nan")
        info = f"loss {loss:.3f} ppl {ppl:.1f} {tokens_per_sec:,.0f} tok/s"
        if "val_loss" in record:
            info += f" | val ppl {record['val_ppl']:.2f}"
        if self._rich is not None:
            self._rich.update(self._task, completed=step, info=info)
        elif step % self.log_every == 0 or "val_loss" in record or step == self.total:
            log.info("step %d/%d %s", step, self.total, info)
