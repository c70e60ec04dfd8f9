"""Run folders: what counts as one, which `--out` is safe, and what `--overwrite` may remove.

A run folder is recognised by the marker file `.rankscope-run.json` the trainer writes when it
creates (or adopts) the folder, never by a `config.yaml` alone, which any project may hold. Runs
written before the marker existed are recognised by their first metrics line (the step-0
evaluation every run logs) next to a config.yaml, and adopted.

`--overwrite` removes only the entries a run consists of (RUN_FILES, RUN_FOLDERS and their
temporary files), never the folder itself and nothing a user put beside them; it refuses a
folder that is not a run folder, one that holds other runs, and one inside another run.

A checkpoint resumes only under the config it was written with: each checkpoint records its
config in meta.json, and a run folder whose checkpoints (or, for older runs, config.yaml) record
another config needs `--overwrite`, which then starts from step 0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from rankscope.config import RunConfig, config_from_dict, config_to_dict, save_config
from rankscope.errors import CheckpointError, ConfigError
from rankscope.io import write_json_atomic
from rankscope.paths import check_output_folder
from rankscope.train import checkpoint as ckpt
from rankscope.train.lock import LOCK_FILE, RunLock
from rankscope.train.sidefiles import INITIAL_EVAL_FILE, METRICS_FILE, SUMMARY_FILE, check_run_files

log = logging.getLogger("rankscope.train")

MARKER_FILE = ".rankscope-run.json"
CONFIG_FILE = "config.yaml"
# Everything rankscope writes into a run folder (the trainer, `analyze` and `eval`).
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, INITIAL_EVAL_FILE)
RUN_FOLDERS = (ckpt.CHECKPOINT_DIR, "analysis", "eval", "tensorboard")

# Fields that change how a run is watched, not what it computes: they may differ on resume.
RESUME_NEUTRAL = {
    ("train", "device"), ("train", "log_every"), ("train", "tensorboard"), ("train", "compile"),
    ("train", "eval_batch_size"), ("train", "keep_last_checkpoints"), ("data", "cache_dir"),
    ("train", "dynamics_every"), ("train", "dynamics_power_iters"), ("train", "spike_factor"), ("train", "spike_window"),
}
# How deep below a folder to look for other runs before --overwrite (a study keeps its runs at
# STUDY/runs/<run>, two levels down).
_NESTED_RUN_DEPTH = 3


def _is_temp_of_run_file(name: str) -> bool:
    return any(name.startswith(f".{base}.tmp") or name.startswith(f"{base}.tmp") for base in RUN_FILES)


def _legacy_run(path: Path) -> bool:
    """A run written before the marker existed: config.yaml and a metrics log opened by the step-0 eval."""
    if not (path / CONFIG_FILE).is_file() or not (path / METRICS_FILE).is_file():
        return False
    try:
        with open(path / METRICS_FILE, "rb") as handle:
            first = json.loads(handle.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and first.get("step") == 0 and "val_loss" in first


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / MARKER_FILE).is_file() or _legacy_run(path)


def _enclosing_run(path: Path) -> Path | None:
    for parent in path.resolve().parents:
        if is_run_dir(parent):
            return parent
    return None


def _nested_runs(path: Path) -> list[Path]:
    """Run folders below `path` (not `path` itself), looked for a few levels deep."""
    found = []
    frontier = [path]
    for _ in range(_NESTED_RUN_DEPTH):
        children = []
        for folder in frontier:
            try:
                entries = [e for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for entry in entries:
                child = Path(entry.path)
                if is_run_dir(child):
                    found.append(child)
                else:
                    children.append(child)
        frontier = children
    return sorted(found)


def _user_entries(path: Path) -> list[str]:
    """Entries of an existing folder, the lock file (from an interrupted start) aside."""
    return sorted(e.name for e in os.scandir(path) if e.name != LOCK_FILE)


def check_run_target(run_dir: Path, overwrite: bool) -> None:
    """Refuse an --out that training must not use; nothing is created or changed here."""
    check_output_folder(run_dir, "--out")
    enclosing = _enclosing_run(run_dir)
    if enclosing is not None:
        raise ConfigError(f"--out {run_dir} lies inside the run folder {enclosing}; choose a folder outside it")
    if not run_dir.is_dir() or not _user_entries(run_dir):
        return  # new or empty: it becomes a run folder
    is_run = is_run_dir(run_dir)
    nested = _nested_runs(run_dir) if (overwrite or not is_run) else []
    names = ", ".join(str(p.relative_to(run_dir)) for p in nested[:3])
    if is_run and nested:
        raise ConfigError(f"--out {run_dir} holds other runs ({names}); --overwrite replaces one run: name that run's own folder")
    if is_run:
        return
    if nested:
        raise ConfigError(
            f"--out {run_dir} is not a run folder but holds runs ({names}); name the run folder itself, e.g. --out {nested[0]}"
        )
    raise ConfigError(
        f"--out {run_dir} is not empty and is not a rankscope run folder (no {MARKER_FILE}); "
        "training never writes into (or --overwrite clears) other folders: choose a new or empty --out"
    )


def clear_run(run_dir: Path) -> None:
    """Remove what rankscope wrote into `run_dir`: its run files and folders, nothing else."""
    for entry in os.scandir(run_dir):
        name = entry.name
        if name in (MARKER_FILE, LOCK_FILE):
            continue
        if name in RUN_FILES or _is_temp_of_run_file(name):
            os.unlink(entry.path)
        elif name in RUN_FOLDERS:
            if entry.is_symlink():  # never follow a link out of the run folder
                os.unlink(entry.path)
            else:
                shutil.rmtree(entry.path)
    log.info("--overwrite: removed the previous run's files from %s", run_dir)


def _write_marker(run_dir: Path) -> None:
    path = run_dir / MARKER_FILE
    if not path.is_file():
        write_json_atomic(path, {"kind": "rankscope-run", "version": 1, "created": time.time()}, indent=None)


def normalized_config(cfg: RunConfig) -> dict:
    """The config as plain JSON types, as meta.json and config.yaml store it."""
    return json.loads(json.dumps(config_to_dict(cfg)))


def as_read_now(recorded: dict) -> dict:
    """A recorded config as the current code reads it: settings added since the run was written
    take their defaults, which keep the behaviour the run was trained with. A record the current
    code cannot read any more is compared as it stands."""
    try:
        return normalized_config(config_from_dict(json.loads(json.dumps(recorded))))
    except (ConfigError, TypeError, ValueError):
        return recorded


def config_difference(old: dict, new: dict) -> str | None:
    """The first field (outside RESUME_NEUTRAL) on which two config dicts differ, or None; `old`
    (a recorded config) is read as the current code reads it (`as_read_now`)."""
    old = as_read_now(old)
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        if not isinstance(a, dict) or not isinstance(b, dict):
            if a != b:
                return f"{section}: {a!r} vs {b!r}"
            continue
        for key in sorted(set(a) | set(b)):
            if (section, key) in RESUME_NEUTRAL:
                continue
            if a.get(key) != b.get(key):
                return f"{section}.{key}: {a.get(key)!r} in the run vs {b.get(key)!r} now"
    return None


def _read_config_file(run_dir: Path) -> dict | None | Exception:
    """config.yaml as a dict; None when absent; the exception when it is damaged."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        return exc
    return data if isinstance(data, dict) else ValueError("not a mapping")


def recorded_difference(run_dir: Path, new: dict) -> str | None:
    """How the run recorded in `run_dir` differs from config `new` (None: same, or nothing recorded).

    The checkpoints are the authority (each records the config it was written with); a run whose
    checkpoints predate that is compared with its config.yaml.
    """
    checkpoints = ckpt.list_checkpoints(run_dir)
    recorded = [(info, info.meta["config"]) for info in checkpoints if isinstance(info.meta.get("config"), dict)]
    for info, old in reversed(recorded):  # newest first: the one a resume would use
        difference = config_difference(old, new)
        if difference:
            return difference.replace("in the run", f"in checkpoint {info.path.name}")
    if recorded:
        return None
    from_file = _read_config_file(run_dir)
    if isinstance(from_file, Exception):
        if checkpoints:
            raise CheckpointError(
                f"{run_dir / CONFIG_FILE} is damaged ({type(from_file).__name__}) and the run's checkpoints do not "
                "record their config; restore that file, or pass --overwrite to start the run again from step 0"
            )
        log.warning("%s is damaged and no checkpoint exists yet; writing it again", run_dir / CONFIG_FILE)
        return None
    if from_file is None:
        if checkpoints:
            raise CheckpointError(
                f"{run_dir} has checkpoints but no {CONFIG_FILE}, and they do not record their config; "
                "restore that file, or pass --overwrite to start the run again from step 0"
            )
        return None
    return config_difference(from_file, new)


def prepare_run_dir(cfg: RunConfig, run_dir: Path, overwrite: bool) -> None:
    """Make `run_dir` ready for this config (caller holds its lock): refuse, clear, or keep it.

    Without --overwrite a run of another config is refused; with it, that run's files are removed
    and training starts from step 0. A run of the same config is resumed either way.
    """
    new = normalized_config(cfg)
    try:
        difference = recorded_difference(run_dir, new)
    except CheckpointError:
        if not overwrite:
            raise
        difference = "unknown (no readable config)"
    if difference and not overwrite:
        raise ConfigError(
            f"{run_dir} holds a run of a different config ({difference}); "
            "pass --overwrite to start it again from step 0, or choose another --out"
        )
    if difference:
        clear_run(run_dir)
    check_run_files(run_dir)
    _write_marker(run_dir)
    save_config(cfg, run_dir / CONFIG_FILE)
    ckpt.clean_temp_dirs(run_dir)


@contextmanager
def open_run_dir(cfg: RunConfig, run_dir: str | Path, overwrite: bool):
    """Check `run_dir`, create and lock it, and prepare it for `cfg`; the lock is held until exit."""
    run_dir = Path(run_dir)
    check_run_target(run_dir, overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        prepare_run_dir(cfg, run_dir, overwrite)
        yield run_dir

