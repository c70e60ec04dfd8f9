"""STUDY_DIR/regime.json: the training regime of every run, so a report can say what its numbers
stand on: each run's lr and where it came from, steps, tokens, tokens per parameter, seeds, the
unigram perplexity of the validation split next to the runs' perplexities, and the chance level
of every downstream task. Written by the study driver after training and before the report
(fields: docs/internals.md, "Study layout")."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from rankscope import methods
from rankscope.config import config_to_dict
from rankscope.study.spec import PlannedRun, StudySpec
from rankscope.study.status import read_json, write_json_atomic

log = logging.getLogger("rankscope.study")

REGIME_FILE = "regime.json"
# Choices per item of lm-eval's built-in tasks of the study suite (chance = 1 / choices).
BUILTIN_CHOICES = {"piqa": 2, "copa": 2, "mrpc": 2, "rte": 2, "mnli": 3, "sst2": 2, "blimp": 2, "arc_easy": 4}


def write_regime(out: Path, planned: list[PlannedRun], spec: StudySpec) -> Path:
    from rankscope.train.setup import resolve_optim

    runs: dict[str, Any] = {}
    data: dict[str, Any] = {}
    for run in planned:
        cfg = run.config
        data_key = hashlib.sha1(json.dumps(config_to_dict(cfg.data), sort_keys=True).encode()).hexdigest()[:12]
        if data_key not in data:
            data[data_key] = {"config": config_to_dict(cfg.data), **_unigram(cfg)}
        optim = resolve_optim(cfg, methods.get(run.method))
        summary = read_json(out / "runs" / run.name / "summary.json") or {}
        tokens = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
        params = summary.get("params")
        runs[run.name] = {
            "method": run.method, "preset": run.preset, "seed": run.seed,
            "lr": optim.lr, "lr_source": run.lr_source, "tuned": dict(run.tuned),
            "weight_decay": optim.weight_decay, "warmup_steps": optim.warmup_steps,
            "min_lr_ratio": optim.min_lr_ratio, "steps": cfg.train.steps, "batch_size": cfg.train.batch_size,
            "seq_len": cfg.data.seq_len, "tokens": tokens, "params": params,
            "trainable_params": summary.get("trainable_params"),
            "tokens_per_param": tokens / params if params else None,
            "val_ppl": summary.get("val_ppl"), "data": data_key,
            "unigram_val_ppl": data[data_key].get("unigram_val_ppl"),
        }
    regime = {
        "study": spec.name, "seeds": list(spec.grid.seeds), "presets": list(spec.grid.presets),
        "methods": list(spec.grid.methods),
        "tune": "tune/chosen.json" if (out / "tune" / "chosen.json").is_file() else None,
        "runs": runs, "data": data, "tasks": task_chance(spec.eval.tasks, spec.eval.limit),
    }
    path = out / REGIME_FILE
    write_json_atomic(path, regime)
    return path


def _unigram(cfg) -> dict[str, Any]:
    """The unigram baseline of a run's data (prepared data are cached after training)."""
    from rankscope.data import prepare_data
    from rankscope.data.unigram import unigram_perplexity

    try:
        result = unigram_perplexity(prepare_data(cfg.data))
    except Exception as exc:  # noqa: BLE001 - the regime file must not stop the study; the report says why
        log.warning("unigram baseline of the data not computed: %s", exc)
        return {"unigram_val_ppl": None, "unigram_error": str(exc)}
    return {"unigram_val_ppl": result["ppl"], "unigram_val_loss": result["loss"],
            "unigram_train_tokens": result["train_tokens"], "val_tokens": result["val_tokens"],
            "vocab_size": result["vocab_size"]}


def task_chance(tasks: list[str], limit: int) -> dict[str, Any]:
    """{task: {chance_acc, items, source}}: the accuracy of guessing uniformly among each item's
    choices, over the items an eval with `limit` scores (0 = all)."""
    from rankscope.analysis.downstream import LOCAL_TASKS, LOCAL_TASKS_DIR, _expand_task_names

    out: dict[str, Any] = {}
    for task in _expand_task_names(tasks) if tasks else []:
        if task in LOCAL_TASKS:
            lines = (LOCAL_TASKS_DIR / task / f"{task}.jsonl").read_text().splitlines()
            items = [json.loads(line) for line in lines if line.strip()]
            items = items[:limit] if limit else items
            chance = sum(1.0 / len(item["choices"]) for item in items) / len(items)
            out[task] = {"chance_acc": chance, "items": len(items), "source": "the task file's choices"}
        elif task in BUILTIN_CHOICES:
            out[task] = {"chance_acc": 1.0 / BUILTIN_CHOICES[task], "items": limit or None,
                         "source": f"{BUILTIN_CHOICES[task]} choices per item"}
        else:
            out[task] = {"chance_acc": None, "items": limit or None, "source": "unknown number of choices"}
    return out
