"""Errors a user can cause. Each carries one line that names the problem and the fix.

Every error class of the package lives here (the modules that raise them re-export them under
their old names), so that a module never imports a package just for its error class.
"""

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


class DamagedFileError(RankscopeError):
    """A file rankscope wrote earlier cannot be parsed (edited, truncated or bit-flipped); the
    message names the file and what to do about it (see rankscope.io.read_json)."""


class LockedError(RankscopeError):
    """A lock (rankscope.locking.FileLock) is held by another live process."""


class RunLockedError(LockedError):
    """Another live process trains in this run folder."""


class DriverLockedError(LockedError):
    """Another live `rankscope study` drives this study folder."""


class HyperparameterError(ConfigError, ValueError):
    """An optimizer hyperparameter is out of range (also a ValueError, as torch optimizers raise)."""


class AnalysisError(RankscopeError, ValueError):
    """Bad input to an analysis metric (wrong shape, bad grid, too few points).

    It is a ``ValueError`` as well, so callers that treat metric misuse as a plain value error
    (and the tests written against the spec) catch it either way.
    """


class DownstreamError(RankscopeError):
    """A downstream evaluation cannot run as asked (unknown task, no data, bad model output)."""


class NonFiniteLossError(RankscopeError):
    """Training stopped on a non-finite loss."""


class NotDenseError(RankscopeError):
    """A parameterized layer has no dense weight equivalent, so the model cannot be exported dense."""


class ScalingFitError(RankscopeError):
    """The data cannot identify the law, or the table is malformed."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A suffix such as " (did you mean 'galore'?)", or the valid choices when nothing is close."""
    candidates = sorted(set(candidates))
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    if close:
        return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
    if len(candidates) <= 12:
        return " (valid: " + ", ".join(candidates) + ")"
    return ""
