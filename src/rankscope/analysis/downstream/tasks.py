"""The task sets: the study's built-in suite (lm-eval's tasks), the offline set shipped with the
package, names and groups, and where each task's data sets come from."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rankscope.errors import DownstreamError, did_you_mean  # noqa: F401 - DownstreamError re-exported

log = logging.getLogger("rankscope.analysis.downstream")

# The study's zero-shot suite (../shared/seeds): lm-eval tasks whose data come from the Hugging
# Face hub (or its local cache). Requested as a whole by the group name HUB_GROUP.
HUB_TASKS: list[str] = ["piqa", "copa", "mrpc", "rte", "mnli", "arc_easy", "blimp", "sst2"]
HUB_GROUP = "rankscope_hub"
# The offline set shipped with the package, requested as a whole by LOCAL_GROUP.
LOCAL_TASKS: list[str] = ["rs_cloze", "rs_word", "rs_speaker"]
LOCAL_GROUP = "rankscope_local"
# What `rankscope eval` and a study's eval stage run when no tasks are given: one default for both
# (study.spec.EvalSpec spells the same list), the set that runs on any machine.
DEFAULT_TASKS: list[str] = ["rankscope_local"]  # a literal: the CLI reads it from the source
GROUPS: dict[str, list[str]] = {LOCAL_GROUP: LOCAL_TASKS, HUB_GROUP: HUB_TASKS}
LOCAL_TASKS_DIR: Path = Path(__file__).resolve().parents[2] / "data" / "tasks"

# Where the study's built-in tasks live inside lm-eval's own task folder. Indexing only these
# folders takes milliseconds; indexing all of lm-eval's ~15k task YAMLs takes 10+ s, which we
# only pay when a name outside this table is requested.
_BUILTIN_TASK_DIRS: dict[str, str] = {
    "piqa": "piqa",
    "copa": "super_glue/copa",
    "mrpc": "glue/mrpc",
    "rte": "glue/rte",
    "mnli": "glue/mnli",
    "sst2": "glue/sst2",
    "arc_easy": "arc",
    "blimp": "blimp",
}



def load_local_task_dataset(**kwargs: Any):
    """`custom_dataset` of the local task YAMLs: read their `data_files` jsonl into a DatasetDict.

    lm-eval passes the task's metadata (including `config_source`, the YAML's path) and its
    `dataset_kwargs`; relative `data_files` are resolved against the YAML's folder.
    """
    import datasets

    data_files = kwargs.get("data_files")
    if not isinstance(data_files, dict) or not data_files:
        raise DownstreamError("a local task YAML needs dataset_kwargs.data_files: {test: <file.jsonl>}")
    source = kwargs.get("config_source")
    base = Path(source).parent if source and source != "inline" else LOCAL_TASKS_DIR
    splits = {}
    for split, name in data_files.items():
        path = Path(name) if Path(name).is_absolute() else base / name
        if not path.is_file():
            raise DownstreamError(f"local task data {path} is missing; regenerate it with scripts/make_local_tasks.py")
        with path.open(encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)



def needs_hub(tasks: Sequence[str] | str | None) -> bool:
    """Whether any of the requested names (before expansion) is read from the Hugging Face hub."""
    if tasks is None:
        tasks = DEFAULT_TASKS
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    return any(name not in LOCAL_TASKS and name != LOCAL_GROUP for name in tasks)


def expand_task_names(tasks: Sequence[str] | str | None) -> list[str]:
    """The requested names with the groups (`rankscope_local`, `rankscope_hub`) expanded,
    duplicates dropped, order kept.

    An unknown name is a DownstreamError, so callers can check a task list before any work (a
    study does, before training). Names in rankscope's own namespace (`rs_`, `rankscope`) are
    checked at once; others against lm-eval's task index, which reads only the study suite's
    folders for its names and all of lm-eval's tasks (10+ s) for any other.
    """
    if tasks is None:
        tasks = DEFAULT_TASKS
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    names: list[str] = []
    for name in tasks:
        for expanded in GROUPS.get(name, [name]):
            if expanded not in names:
                names.append(expanded)
    if not names:
        raise DownstreamError("no tasks given; use e.g. tasks=['rankscope_local']")
    for name in names:
        if name.startswith(("rs_", "rankscope")) and name not in LOCAL_TASKS:
            raise DownstreamError(f"unknown local task {name!r}{did_you_mean(name, LOCAL_TASKS + list(GROUPS))}")
    if any(name not in LOCAL_TASKS for name in names):
        index = manager_for(names).task_index
        unknown = [n for n in names if n not in index]
        if unknown:
            hint = did_you_mean(unknown[0], LOCAL_TASKS + list(GROUPS) + HUB_TASKS)
            raise DownstreamError(f"unknown lm-eval task {unknown[0]!r}{hint}")
    return names


@functools.lru_cache(maxsize=4)
def _task_manager(include_dirs: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    with quiet_lm_eval(True):
        return TaskManager(include_path=list(include_dirs), include_defaults=include_defaults)


def manager_for(names: Sequence[str]):
    """A TaskManager that knows the local tasks and every requested built-in task."""
    import lm_eval

    builtin = [n for n in names if n not in LOCAL_TASKS]
    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    dirs = [str(LOCAL_TASKS_DIR)]
    known = all(n in _BUILTIN_TASK_DIRS and (tasks_root / _BUILTIN_TASK_DIRS[n]).is_dir() for n in builtin)
    if known:
        dirs += sorted({str(tasks_root / _BUILTIN_TASK_DIRS[n]) for n in builtin})
        return _task_manager(tuple(dirs), False)
    return _task_manager(tuple(dirs), True)


def task_datasets(manager, name: str, seen: set[str] | None = None) -> list[tuple[str, str | None]]:
    """The (dataset_path, dataset_name) pairs a task, group or tag reads."""
    seen = set() if seen is None else seen
    if name in seen:
        return []
    seen.add(name)
    entry = manager.task_index.get(name)
    if entry is None:
        return []
    kind = entry.kind.name
    if kind == "TAG":
        return [ds for member in sorted(entry.tags) for ds in task_datasets(manager, member, seen)]
    cfg = entry.cfg or {}
    if kind == "GROUP":
        out = []
        members = cfg.get("task") or []
        for member in members if isinstance(members, list) else [members]:
            if isinstance(member, str):
                out += task_datasets(manager, member, seen)
            elif isinstance(member, dict):
                if isinstance(member.get("task"), str) and member["task"] in manager.task_index:
                    out += task_datasets(manager, member["task"], seen)
                if member.get("dataset_path"):
                    out.append((member["dataset_path"], member.get("dataset_name")))
        return out
    if cfg.get("dataset_path"):
        return [(cfg["dataset_path"], cfg.get("dataset_name"))]
    return []


@contextlib.contextmanager
def quiet_lm_eval(quiet: bool) -> Iterator[None]:
    """lm-eval logs every task it builds (INFO) and warns about settings we choose on purpose
    (zero-shot override, custom dataset loader, tags shared across the folders we index);
    keep it to errors unless asked."""
    if not quiet:
        yield
        return
    import datasets

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar per task and split, 30 per run of a study
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()
