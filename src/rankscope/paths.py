"""Checks on folders a command is about to write into, so a bad path fails in one line up front."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rankscope.errors import ConfigError


def nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists (as a file or a folder)."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def can_write_in(folder: Path) -> bool:
    """Whether a file can be created in `folder`, found out by creating (and removing) one.

    Permission bits alone do not say it: root ignores them, and read-only mounts, ACLs and
    kernel file systems refuse writes whatever the bits are.
    """
    try:
        handle, name = tempfile.mkstemp(prefix=".rankscope-write-test-", dir=folder)
    except OSError:
        return False
    os.close(handle)
    os.unlink(name)
    return True


def check_output_folder(path: str | Path, what: str, writable: bool = True) -> Path:
    """Raise ConfigError unless `path` is, or can become, a folder we write into.

    `what` names the setting in the message ("--out", "RANKSCOPE_CACHE", ...). A path that does
    not exist yet is fine when its nearest existing ancestor is a folder we can write in.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder; name a folder (new or existing)")
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise ConfigError(f"{what} {path} lies under {existing}, which is a file; name a path inside a folder")
    if writable and not can_write_in(existing):
        place = "" if existing == path else f" (in {existing})"
        raise ConfigError(
            f"{what} {path} cannot be written{place}: the folder is read-only or not yours; choose a folder you can write to"
        )
    return path
