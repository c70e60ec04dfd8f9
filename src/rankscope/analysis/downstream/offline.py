"""What can run here: whether a task's data sets are in the local Hugging Face caches, whether
the hub is reachable, and offline mode (set before the libraries load) when it is not."""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from rankscope.analysis.downstream.tasks import (
    LOCAL_GROUP,
    LOCAL_TASKS,
    expand_task_names,
    manager_for,
    needs_hub,
    task_datasets,
)
from rankscope.errors import DownstreamError, did_you_mean  # noqa: F401 - DownstreamError re-exported

log = logging.getLogger("rankscope.analysis.downstream")


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()


def dataset_cached(path: str) -> bool:
    """Whether a hub data set (or a local folder) is on disk: hub cache or `datasets` cache."""
    if Path(path).expanduser().is_dir():
        return True
    hub_cache = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or _hf_home() / "hub")
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or _hf_home() / "datasets")
    hub_name = "datasets--" + path.replace("/", "--")
    datasets_name = path.replace("/", "___")
    candidates = [hub_cache / hub_name, datasets_cache / datasets_name, datasets_cache / datasets_name.lower()]
    return any(c.expanduser().is_dir() for c in candidates)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _offline_by_setting() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set now, or huggingface_hub in offline mode (read at its import)."""
    import huggingface_hub

    return (_truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("HF_DATASETS_OFFLINE"))
            or huggingface_hub.is_offline_mode())


@functools.lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    """Whether the Hugging Face endpoint answers a TCP connect within 3 s (asked once per process)."""
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=3):
            return True
    except OSError:
        return False


def network_available() -> bool:
    return not _offline_by_setting() and _hub_reachable()


def available_tasks(tasks: Sequence[str] | str | None = None) -> tuple[list[str], dict[str, str]]:
    """Split `tasks` (default: `DEFAULT_TASKS`) into those that can run here and the others.

    Local tasks are always available. A built-in task is available when every data set it
    reads is in the local Hugging Face cache, or when the hub is reachable (it will be
    downloaded). Returns `(available, {name: reason})`; an unknown name raises DownstreamError.
    """
    names = expand_task_names(tasks)
    manager = manager_for(names)
    available: list[str] = []
    unavailable: dict[str, str] = {}
    online: bool | None = None
    for name in names:
        if name in LOCAL_TASKS:
            available.append(name)
            continue
        missing = sorted({path for path, _ in task_datasets(manager, name) if not dataset_cached(path)})
        if not missing:
            available.append(name)
            continue
        if online is None:
            online = network_available()
        if online:
            available.append(name)
        else:
            unavailable[name] = (
                f"data set {missing[0]} not in the local Hugging Face cache and no network: "
                f"run once online or use --tasks {LOCAL_GROUP}"
            )
    return available, unavailable


# The libraries that read HF_HUB_OFFLINE once, when they are first imported.
_HUB_LIBRARIES = ("huggingface_hub", "datasets")


def settle_hub_mode(tasks: Sequence[str] | str | None = None) -> bool:
    """Put this process in the Hugging Face libraries' offline mode when the hub is unreachable,
    the way they document it: HF_HUB_OFFLINE=1 in the environment before they are imported.

    Offline mode makes `datasets` read a cached data set without first trying the network (which
    fails or waits for time-outs without it). Call it before anything imports `huggingface_hub`
    or `datasets` (lm-eval and transformers do); the CLI's eval command and the study's eval jobs
    do, first thing. Returns whether the process is in offline mode. Where the libraries were
    imported already in online mode, the mode cannot change any more (they offer no switch at
    run time): it says so once and the libraries fall back to their caches after a failed lookup.
    Only local tasks requested: nothing to decide (no connection attempt).
    """
    if not needs_hub(tasks):
        return False
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("HF_DATASETS_OFFLINE")):
        return True
    if _hub_reachable():
        return False
    loaded = [name for name in _HUB_LIBRARIES if name in sys.modules]
    if not loaded:
        os.environ["HF_HUB_OFFLINE"] = "1"
        log.info("the Hugging Face hub is unreachable: reading data sets from the local cache (HF_HUB_OFFLINE=1)")
        return True
    import huggingface_hub

    if huggingface_hub.is_offline_mode():
        return True
    log.warning("the Hugging Face hub is unreachable, but %s was imported in online mode; set HF_HUB_OFFLINE=1 "
                "to read cached data sets without network lookups", loaded[0])
    return False
