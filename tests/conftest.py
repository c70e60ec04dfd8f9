"""Shared test setup: one token cache per session, so the embedded corpus is prepared once.

Helpers that tests import (TINY_RUN, the interrupt-and-resume harness, ...) live in helpers.py:
importing conftest itself is discouraged by pytest."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import TINY_RUN  # tests/ is on sys.path (rootdir conftest, no __init__.py)

# Tiny shapes gain nothing from intra-op threads, and on a busy 2-core machine extra threads
# make small SVDs and matmuls many times slower (measured: 16x on a tiny forward).
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def rankscope_cache(tmp_path_factory):
    cache = os.environ.get("RANKSCOPE_TEST_CACHE") or str(tmp_path_factory.mktemp("rankscope-cache"))
    previous = os.environ.get("RANKSCOPE_CACHE")
    os.environ["RANKSCOPE_CACHE"] = cache
    yield cache
    if previous is None:
        os.environ.pop("RANKSCOPE_CACHE", None)
    else:
        os.environ["RANKSCOPE_CACHE"] = previous


@pytest.fixture
def tiny_overrides():
    return list(TINY_RUN)


@pytest.fixture
def lock_holder():
    """Start another process that takes a run folder's lock and keeps it until the test ends."""
    import subprocess
    import sys
    from pathlib import Path

    import rankscope

    holders = []

    def start(run_dir) -> subprocess.Popen:
        src = str(Path(rankscope.__file__).parents[1])
        env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys, time; from rankscope.train.lock import RunLock; "
             "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(300)", str(run_dir)],
            stdout=subprocess.PIPE, text=True, env=env,
        )
        holders.append(holder)
        assert holder.stdout.readline().strip() == "held"
        return holder

    yield start
    for holder in holders:
        holder.kill()
        holder.wait()
        holder.stdout.close()
