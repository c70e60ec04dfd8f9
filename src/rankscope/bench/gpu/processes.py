"""Process plumbing of the GPU check: a child that dies with its parent."""

from __future__ import annotations

import sys


def die_with_parent(signal_number: int) -> None:
    """Ask Linux to send this process `signal_number` when its parent dies (elsewhere a no-op):
    a check killed from outside then leaves no worker (or torchrun) holding the GPU."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal_number)
