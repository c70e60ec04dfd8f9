"""Errors a user can cause. Each carries one line that names the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RankscopeError(Exception):
    """Base class: the CLI prints the message as one line and exits with status 2."""


class ConfigError(RankscopeError):
    """A configuration key or value is invalid."""


class DataError(RankscopeError):
    """A data source, tokenizer or token shard cannot be used."""


class CheckpointError(RankscopeError):
    """A run directory or checkpoint is missing, incomplete or corrupt."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A suffix such as " (did you mean 'galore'?)", or the valid choices when nothing is close."""
    candidates = sorted(set(candidates))
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    if close:
        return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
    if len(candidates) <= 12:
        return " (valid: " + ", ".join(candidates) + ")"
    return ""
