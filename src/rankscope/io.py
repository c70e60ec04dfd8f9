"""Reading and writing the JSON files rankscope keeps on disk: one writer, one reader, one policy.

Writing (:func:`write_json_atomic`): the data goes to a temporary file in the same folder (a name
unique to this process and call), is synced, and is renamed over the target in one
`os.replace`, so a crash or a failing serializer leaves the old file or the new one, never half
of one. The output is **strict** JSON that `jq` and JavaScript read: NaN and infinities become
`null`, numpy scalars and arrays become numbers and lists, and anything else that JSON cannot
hold raises a TypeError naming where it sits (``data['runs'][2]['lr']``) instead of being written
as `null` or as a string.

Reading (:func:`read_json`): a missing file and a damaged one are different things. A missing
file gives `missing` (None unless asked otherwise). A damaged file (not JSON, not UTF-8, or not
of the expected type) is a one-line :class:`~rankscope.errors.DamagedFileError` naming the file
and the fix, unless the caller says `on_damage="none"`: then it gets None, and the damage is
logged (and added to `notes` when given), never passed off as a missing file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from rankscope.errors import DamagedFileError

log = logging.getLogger("rankscope.io")

DEFAULT_FIX = "delete it (rankscope writes it again) or restore it from a backup"


# ---------------------------------------------------------------------------------------------
# writing


def _key(path: str, key: Any) -> str:
    return f"{path}[{key!r}]"


def to_plain(value: Any, *, default: Callable[[Any], Any] | None = None, path: str = "data") -> Any:
    """`value` as plain JSON types (dict with str keys, list, str, int, float, bool, None):
    non-finite floats as None, numpy scalars and arrays as numbers and lists, tuples as lists.
    `default(obj)` converts anything else, or raises TypeError; without it, anything else is a
    TypeError that names its place in `value`."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return int(value)  # an IntEnum or bool-like subclass as a plain int
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(key, str):
                name = key
            elif isinstance(key, (bool, int, float)) or key is None:
                name = json.dumps(key)  # the key JSON itself would write
            elif hasattr(key, "item") and not hasattr(key, "__len__"):  # a numpy scalar key
                name = json.dumps(key.item())
            else:
                raise TypeError(f"{_key(path, key)}: a key of type {type(key).__name__} cannot be a JSON key")
            out[name] = to_plain(item, default=default, path=_key(path, key))
        return out
    if isinstance(value, (list, tuple)):
        return [to_plain(item, default=default, path=_key(path, i)) for i, item in enumerate(value)]
    if type(value).__module__.split(".")[0] == "numpy" and hasattr(value, "tolist"):
        # ndarrays and numpy scalars (the tolist of a scalar is the scalar)
        return to_plain(value.tolist(), default=default, path=path)
    if default is not None:
        try:
            converted = default(value)
        except TypeError as exc:
            raise TypeError(f"{path}: {exc}") from None
        return to_plain(converted, default=None, path=path)
    raise TypeError(f"{path}: a {type(value).__name__} is not JSON serializable ({value!r:.80})")


def dumps(data: Any, *, indent: int | None = None, sort_keys: bool = False,
          default: Callable[[Any], Any] | None = None) -> str:
    """`data` as strict JSON text (see :func:`to_plain`); the one-line form for JSONL files."""
    return json.dumps(to_plain(data, default=default), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json_atomic(path: str | Path, data: Any, *, fsync: bool = True, indent: int | None = 2,
                      sort_keys: bool = False, default: Callable[[Any], Any] | None = None) -> None:
    """Replace `path` by `data` as strict JSON in one atomic rename; creates the parent folder.

    The text is built before any file is touched, so a value that cannot be written (TypeError
    naming its place) leaves the old file as it was. `fsync` syncs the file before the rename
    (leave it on for anything a later run trusts; off only for files rebuilt anyway).
    """
    path = Path(path)
    text = dumps(data, indent=indent, sort_keys=sort_keys, default=default) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# reading


def read_json(path: str | Path, *, on_damage: Literal["raise", "none"] = "raise", missing: Any = None,
              expect: type | tuple[type, ...] | None = None, fix: str = DEFAULT_FIX,
              notes: list[str] | None = None, error: type[Exception] = DamagedFileError) -> Any:
    """The JSON content of `path`; `missing` when there is no such file.

    A damaged file (not UTF-8, not JSON, or not an instance of `expect`) is never read as a
    missing one:
    - ``on_damage="raise"`` (the default): `error` (DamagedFileError unless the caller has its
      own, e.g. CheckpointError) with the one line "PATH is damaged (WHY); FIX";
    - ``on_damage="none"``: None, for a caller that can go on without the file (it says why at its
      call); the damage is logged as a warning and appended to `notes` when given.
    NaN and Infinity tokens (written by older versions) are read as floats.
    """
    if on_damage not in ("raise", "none"):
        raise ValueError(f"on_damage must be 'raise' or 'none', not {on_damage!r}")
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return missing
    try:
        data = json.loads(raw)
        why = None
        if expect is not None and not isinstance(data, expect):
            names = "/".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
            why = f"holds a {type(data).__name__}, not a {names}"
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are
        why = type(exc).__name__  # the position inside a damaged file helps nobody fix it
    if why is None:
        return data
    message = f"{path} is damaged ({why}); {fix}"
    if on_damage == "raise":
        raise error(message)
    log.warning("%s (read as unusable, not as missing)", message)
    if notes is not None:
        notes.append(message)
    return None
