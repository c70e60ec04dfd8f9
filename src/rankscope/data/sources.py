"""Where documents come from: the embedded corpus, local files, or Hugging Face data sets.

Every source yields plain-text documents for three roles: `train`, `val` and `probe`.

Local files (`data.source` = a file or a folder):
- `.txt` (and `.txt.gz`): documents are separated by runs of two or more empty lines (three or
  more line breaks in a row); a file without such a run is a single document.
- `.jsonl`, `.jsonl.gz`, `.json.gz` (the C4 shard format `c4-train.00000-of-01024.json.gz`): one
  JSON object per line; the document is its `data.text_field` entry.
- A folder: every such file under it, recursively, in sorted path order.

Held-out text, in order of preference:
1. the source's own validation data: for HF data sets the `data.hf_val_split` split; for local
   files, files (or folders) whose name contains "valid" (`valid`, `validation`), either inside
   the source folder or next to the source file/folder. `val` is then the first
   `val_sequences` packed sequences of that text and `probe` the `probe_sequences` after them.
2. otherwise a deterministic hash hold-out of documents, like the embedded corpus's: the key
   `f"{file_relpath}#{document_index}"` (or `f"row#{index}"` for HF rows) falls in bucket 0-3 ->
   `val`, 4-6 -> `probe`, any other bucket -> `train` (non-embedded sources have no `tasks` split).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rankscope.config import DataConfig
from rankscope.data import corpus
from rankscope.errors import DataError

log = logging.getLogger("rankscope.data")

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES

_DOCUMENT_BREAK = re.compile(r"\n[ \t\r]*\n[ \t\r]*\n")
_VALID_NAME = re.compile(r"valid", re.IGNORECASE)


@dataclass
class Source:
    """Documents of one source, by role.

    `identity` changes whenever the documents could change; it keys the caches.
    When `shared_heldout` is true, `val` and `probe` are consecutive slices of the one packed
    stream `documents("val")` (the source's validation split) and `documents("probe")` is unused.
    """

    identity: str
    description: str
    shared_heldout: bool
    _documents: Callable[[str], Iterator[str]]

    def documents(self, role: str) -> Iterator[str]:
        return self._documents(role)


def open_source(cfg: DataConfig) -> Source:
    """The `Source` that `cfg.source` names; DataError when it does not exist or cannot be read."""
    spec = cfg.source.strip()
    if spec in ("", "embedded"):
        return _embedded_source()
    if spec.startswith("hf:"):
        return _hf_hub_source(spec[3:], cfg)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"data source {spec!r} does not exist; pass an existing file or folder, 'embedded', or hf:NAME[:CONFIG]"
        )
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _hf_disk_source(path, cfg)
    return _local_source(path, cfg)


# ---------------------------------------------------------------------------------------------
# embedded


def _embedded_source() -> Source:
    def documents(role: str) -> Iterator[str]:
        return iter(corpus.embedded_documents(role))

    return Source(corpus.corpus_identity(), "the embedded Shakespeare corpus", False, documents)


# ---------------------------------------------------------------------------------------------
# hash hold-out shared by local files and HF data sets


def _heldout_role(key: str) -> str:
    split = corpus.split_of(key)
    return split if split in ("val", "probe") else "train"


def _select(keyed_documents: Iterable[tuple[str, str]], role: str) -> Iterator[str]:
    for key, text in keyed_documents:
        if _heldout_role(key) == role:
            yield text


# ---------------------------------------------------------------------------------------------
# local files


def _has_supported_suffix(path: Path) -> bool:
    return path.name.lower().endswith(SUPPORTED_SUFFIXES)


def _is_valid_name(path: Path) -> bool:
    return bool(_VALID_NAME.search(path.name))


def _list_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and _has_supported_suffix(p))


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def file_documents(path: Path, text_field: str) -> Iterator[str]:
    """The documents of one local file (see the module docstring for the formats)."""
    name = path.name.lower()
    try:
        if name.endswith(TEXT_SUFFIXES):
            with _open_text(path) as handle:
                text = handle.read()
            for doc in _DOCUMENT_BREAK.split(text):
                doc = doc.strip()
                if doc:
                    yield doc
            return
        with _open_text(path) as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{path} line {line_number} is not valid JSON; each line must be one JSON object") from None
                if not isinstance(record, dict) or text_field not in record:
                    keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
                    raise DataError(
                        f"{path} line {line_number} has no {text_field!r} field (it has: {keys}); set data.text_field"
                    )
                text = record[text_field]
                if isinstance(text, str) and text.strip():
                    yield text
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {path} ({type(exc).__name__}: {exc}); check the file") from None


def _files_identity(files: list[Path]) -> list[tuple[str, int, int]]:
    out = []
    for f in files:
        stat = f.stat()
        out.append((str(f.resolve()), stat.st_size, stat.st_mtime_ns))
    return out


def _local_source(path: Path, cfg: DataConfig) -> Source:
    if path.is_file() and not _has_supported_suffix(path):
        raise DataError(
            f"data source {str(path)!r} has an unsupported type; use .txt, .jsonl, .jsonl.gz or .json.gz files or a folder of them"
        )
    root = path if path.is_dir() else path.parent
    if path.is_dir():
        inside = _list_files(path)
        train_files = [f for f in inside if not any(_is_valid_name(Path(p)) for p in f.relative_to(path).parts)]
        valid_files = [f for f in inside if f not in train_files]
    else:
        train_files, valid_files = [path], []
    if not valid_files:
        # Validation data next to the source: `c4-validation.*.json.gz` beside `c4-train.*`, or a
        # `validation/` folder beside a `train/` folder.
        for sibling in sorted(path.resolve().parent.iterdir()):
            if sibling == path.resolve() or not _is_valid_name(sibling):
                continue
            if sibling.is_file() and _has_supported_suffix(sibling):
                valid_files.append(sibling)
            elif sibling.is_dir():
                valid_files.extend(_list_files(sibling))
    if not train_files:
        raise DataError(f"data folder {str(path)!r} holds no .txt/.jsonl/.jsonl.gz/.json.gz training files")

    field = cfg.text_field

    def keyed(files: list[Path]) -> Iterator[tuple[str, str]]:
        for f in files:
            rel = f.relative_to(root).as_posix() if f.is_relative_to(root) else f.name
            for index, doc in enumerate(file_documents(f, field)):
                yield f"{rel}#{index}", doc

    def plain(files: list[Path]) -> Iterator[str]:
        for _, doc in keyed(files):
            yield doc

    identity_parts = {"kind": "local", "train": _files_identity(train_files), "valid": _files_identity(valid_files),
                      "text_field": field}
    if valid_files:
        log.info("held-out data from %d validation file(s) beside the training data", len(valid_files))

        def documents(role: str) -> Iterator[str]:
            return plain(train_files) if role == "train" else plain(valid_files)
    else:

        def documents(role: str) -> Iterator[str]:
            return _select(keyed(train_files), role)

    identity = "local:" + hashlib.sha256(json.dumps(identity_parts, sort_keys=True).encode()).hexdigest()
    return Source(identity, f"local data {path}", bool(valid_files), documents)


# ---------------------------------------------------------------------------------------------
# Hugging Face data sets


def _column_texts(dataset, field: str, where: str) -> Iterator[str]:
    """Texts of `field` from a `datasets.Dataset` or `IterableDataset`, read in batches."""
    columns = getattr(dataset, "column_names", None)
    if columns is not None and field not in columns:
        raise DataError(f"{where} has no {field!r} column (it has: {', '.join(columns)}); set data.text_field")
    if hasattr(dataset, "select_columns"):
        dataset = dataset.select_columns([field])
    if hasattr(dataset, "iter"):
        for batch in dataset.iter(batch_size=1000):
            for text in batch[field]:
                if isinstance(text, str) and text.strip():
                    yield text
        return
    for row in dataset:  # pragma: no cover - older `datasets` without .iter
        text = row.get(field)
        if isinstance(text, str) and text.strip():
            yield text


def _keyed_rows(dataset, field: str, where: str) -> Iterator[tuple[str, str]]:
    # Rows are keyed by their index in the split, so the hold-out is the same on every machine.
    for index, text in enumerate(_column_texts(dataset, field, where)):
        yield f"row#{index}", text


def _hf_source(name: str, train, valid, cfg: DataConfig, identity: str) -> Source:
    field = cfg.text_field
    if valid is not None:
        log.info("held-out data from split %r of %s", cfg.hf_val_split, name)

        def documents(role: str) -> Iterator[str]:
            if role == "train":
                return _column_texts(train, field, f"split {cfg.hf_split!r} of {name}")
            return _column_texts(valid, field, f"split {cfg.hf_val_split!r} of {name}")
    else:
        log.info("%s has no split %r: holding out documents by hash", name, cfg.hf_val_split)

        def documents(role: str) -> Iterator[str]:
            return _select(_keyed_rows(train, field, f"split {cfg.hf_split!r} of {name}"), role)

    return Source(identity, f"HF data set {name}", valid is not None, documents)


def parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """`NAME[:CONFIG]` -> (NAME, CONFIG or None)."""
    name, _, config = spec.partition(":")
    if not name:
        raise DataError("data.source hf: needs a data set name, e.g. hf:allenai/c4:en")
    return name, (config or None)


def _hf_hub_source(spec: str, cfg: DataConfig) -> Source:
    import datasets

    name, config = parse_hf_spec(spec)
    where = f"hf:{spec}"
    try:
        train = datasets.load_dataset(name, config, split=cfg.hf_split, streaming=cfg.streaming)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(
            f"Hugging Face data set {where} (split {cfg.hf_split!r}) cannot be loaded ({reason}); "
            "check the name, split and network, or use a local file or folder"
        ) from None
    try:
        valid = datasets.load_dataset(name, config, split=cfg.hf_val_split, streaming=cfg.streaming)
    except (ValueError, KeyError):  # the data set has no such split: hold out by hash instead
        valid = None
    revision = getattr(train, "_fingerprint", None) if not cfg.streaming else None
    identity = "hf:" + json.dumps(
        [name, config, cfg.hf_split, cfg.hf_val_split if valid is not None else None, cfg.text_field, revision]
    )
    return _hf_source(where, train, valid, cfg, identity)


def _hf_disk_source(path: Path, cfg: DataConfig) -> Source:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"saved data set {str(path)!r} cannot be loaded ({reason}); re-save it with save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        if cfg.hf_split not in loaded:
            raise DataError(
                f"saved data set {str(path)!r} has no split {cfg.hf_split!r} (it has: {', '.join(loaded)}); set data.hf_split"
            )
        train = loaded[cfg.hf_split]
        valid = loaded[cfg.hf_val_split] if cfg.hf_val_split in loaded else None
    else:
        train, valid = loaded, None
    fingerprints = [getattr(train, "_fingerprint", None), getattr(valid, "_fingerprint", None)]
    identity = "hf-disk:" + json.dumps(
        [str(path.resolve()), cfg.hf_split, cfg.hf_val_split if valid is not None else None, cfg.text_field, fingerprints]
    )
    if cfg.streaming:
        # Read lazily, shard by shard, instead of through the memory-mapped table.
        train = train.to_iterable_dataset()
        valid = valid.to_iterable_dataset() if valid is not None else None
    return _hf_source(str(path), train, valid, cfg, identity)
