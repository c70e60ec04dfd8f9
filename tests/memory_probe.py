"""Bytes torch allocates on the CPU while a function runs, from torch's own allocation records.

tracemalloc does not see torch's allocator and process RSS is noisy, so the tests that bound
memory read torch.profiler's memory records instead: every allocation is charged to the op that
made it (at the op's start) and every free is a "[memory]" record with a negative size at the
moment it happened. Summing them in time order gives the bytes live at each op, to op resolution
(a temporary allocated and freed inside one op is not seen).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class CpuBytes:
    result: Any
    peak: int  # the most bytes live at once above what was live when `fn` started
    retained: int  # bytes allocated by `fn` and still live when it returned (its result included)


def cpu_bytes(fn: Callable[[], Any]) -> CpuBytes:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    # An op's self memory: what it allocated (minus what it freed) itself, not in the ops it called.
    changes = sorted((event.time_range.start, event.self_cpu_memory_usage) for event in prof.events()
                     if event.self_cpu_memory_usage)
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return CpuBytes(result, peak, live)
