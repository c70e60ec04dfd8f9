"""`evaluate_model`: lm-eval's `simple_evaluate` on a task list with a rankscope model, the
tasks that cannot run here skipped with the reason, a compact dict of accuracies."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rankscope.analysis.downstream import lm as lm_module
from rankscope.analysis.downstream.offline import available_tasks, settle_hub_mode
from rankscope.analysis.downstream.tasks import manager_for, quiet_lm_eval
from rankscope.errors import DownstreamError, did_you_mean  # noqa: F401 - DownstreamError re-exported

log = logging.getLogger("rankscope.analysis.downstream")




def _metric(values: dict[str, Any], key: str) -> float | None:
    """A metric from lm-eval's `"<metric>,<filter>"` keys; None when absent or not a number."""
    for full_key, value in values.items():
        if full_key.split(",")[0] == key and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] | str | None = None,
    batch_size: int = 16,
    limit: int | float | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    max_length: int | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Zero-shot accuracy of `model` on `tasks` (default `DEFAULT_TASKS`; `rankscope_local` for
    the offline set) through `lm_eval.simple_evaluate`.

    Tasks that cannot run here (see `available_tasks`) are skipped and listed with the reason;
    if none can run, DownstreamError. Returns::

        {"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}},  # norm only where the task has it
         "mean_acc": mean of "acc" over the evaluated tasks (NaN if none has acc),
         "evaluated": [names], "unavailable": {name: reason},
         "num_fewshot": 0, "limit": limit, "seed": seed}
    """
    settle_hub_mode(tasks)  # before lm-eval imports datasets and huggingface_hub
    from lm_eval import simple_evaluate

    available, unavailable = available_tasks(tasks)
    for name, reason in unavailable.items():
        log.warning("skipping task %s: %s", name, reason)
    if not available:
        first = next(iter(unavailable.values()))
        raise DownstreamError(f"none of the requested tasks can run here: {first}")
    manager = manager_for(available)
    lm = lm_module.RankscopeLM(model, tokenizer, batch_size=batch_size, device=device, max_length=max_length)
    with quiet_lm_eval(not verbose):
        output = simple_evaluate(
            model=lm,
            tasks=list(available),
            num_fewshot=0,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=100,  # acc/acc_norm stderr is analytic; only non-mean metrics (f1) bootstrap
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if output is None:  # only on non-zero ranks, which a single in-memory model never is
        raise DownstreamError("lm-eval returned no results")
    per_task: dict[str, dict[str, float]] = {}
    for name in available:
        values = output["results"].get(name, {})
        row: dict[str, float] = {}
        for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            value = _metric(values, metric)
            if value is not None:
                row[metric] = value
        n_samples = output.get("n-samples", {}).get(name, {})
        if isinstance(n_samples, dict) and "effective" in n_samples:
            row["n"] = int(n_samples["effective"])
        per_task[name] = row
    accuracies = [row["acc"] for row in per_task.values() if "acc" in row and not math.isnan(row["acc"])]
    return {
        "tasks": per_task,
        "mean_acc": float(sum(accuracies) / len(accuracies)) if accuracies else float("nan"),
        "evaluated": list(available),
        "unavailable": unavailable,
        "num_fewshot": 0,
        "limit": limit,
        "seed": seed,
    }


