"""The unit of work of a study: a job (train one run, analyse one preset/seed group, evaluate one
run), and `execute_job`, the one function that runs a job wherever a launcher put it.

A job is a small picklable description (paths and plain config mappings, no tensors); the
process that runs it rebuilds everything from disk. Every launcher calls `execute_job`, so a run
computes the same numbers in the driver's worker pool, in a submitit-local subprocess or on a
SLURM node. It writes the job's outcome file and log (see study/status.py) and holds a lock on the
job, so that two processes never work on the same run folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rankscope.errors import LockedError
from rankscope.io import read_json, write_json_atomic
from rankscope.locking import FileLock, FlockUnavailable
from rankscope.study.status import JobFiles, error_line

log = logging.getLogger("rankscope.study")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True, kw_only=True)
class Job(ABC):
    stage: str
    name: str  # unique within its stage; names the outcome and log files
    runs: tuple[str, ...]  # the study runs whose status this job decides
    # Whether the job stops at a clean point on request (a training run checkpoints its current
    # step); other jobs are simply interrupted and redo their unfinished part (analysis items and
    # eval files are written atomically).
    stops_gracefully: ClassVar[bool] = False

    @abstractmethod
    def run(self) -> dict[str, Any]:
        """Do the work; returns a small JSON-able summary for the outcome file."""

    @abstractmethod
    def finished_on_disk(self) -> bool:
        """Whether the job's results are present (a done outcome alone is not trusted)."""

    def fingerprint(self) -> str:
        """Hash of everything that decides the job's results: a changed study re-runs the job."""
        fields = dataclasses.asdict(self)
        return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def progress(self) -> str | None:
        """A short live description of how far a running job is (None: nothing to say)."""
        return None


@dataclass(frozen=True, kw_only=True)
class TrainJob(Job):
    """Train (or resume) one run. A `tune` stage submits these too, with its own run folders."""

    run_dir: str
    config: dict  # config_to_dict of the run's RunConfig
    stops_gracefully: ClassVar[bool] = True

    def run(self) -> dict[str, Any]:
        from rankscope.config import config_from_dict
        from rankscope.train import train

        summary = train(config_from_dict(self.config), self.run_dir)
        log.info("%s: val ppl %.2f", self.name, summary["val_ppl"])
        return {key: summary.get(key) for key in ("val_loss", "val_ppl", "resumed_from", "wall_time")}

    def finished_on_disk(self) -> bool:
        return (Path(self.run_dir) / "summary.json").is_file()

    def progress(self) -> str | None:
        record = last_metrics_record(Path(self.run_dir) / "metrics.jsonl")
        if not record or "loss" not in record:
            return None
        return f"step {record['step']}/{self.config['train']['steps']} loss {record['loss']:.3f}"


TUNE_METRICS = ("val_loss", "best_val_loss", "train_loss")


@dataclass(frozen=True, kw_only=True)
class TuneJob(TrainJob):
    """One tuning run: trained like any run, then scored by the tune metric into `result_file`.

    A run that diverges (a non-finite loss stops it, or it ends with a non-finite or higher loss
    than it started with) is a result, not a failure: its score is the worst there is, and the
    tune stage goes on. Its checkpoints are deleted once it is scored unless asked to keep them.
    """

    result_file: str
    metric: str
    keep_checkpoints: bool = False

    def run(self) -> dict[str, Any]:
        import shutil

        from rankscope.config import config_from_dict
        from rankscope.train import train
        from rankscope.train.trainer import NonFiniteLossError

        # An earlier attempt's result (of this job or of a changed one) must never be read as this one's.
        Path(self.result_file).unlink(missing_ok=True)
        try:
            summary = train(config_from_dict(self.config), self.run_dir)
            result = score_tuning_run(Path(self.run_dir), summary, self.metric)
        except NonFiniteLossError as exc:
            result = {"diverged": True, "score": None, "val_loss": None, "error": str(exc)}
        result["fingerprint"] = self.fingerprint()
        # The result first: a kill between the two leaves a scored run, not a re-training.
        write_json_atomic(Path(self.result_file), result)
        if not self.keep_checkpoints:
            shutil.rmtree(Path(self.run_dir) / "checkpoints", ignore_errors=True)
        log.info("%s: %s", self.name, "diverged" if result["diverged"] else f"{self.metric} {result['score']:.4f}")
        return result

    def finished_on_disk(self) -> bool:
        return self.read_result() is not None

    def read_result(self) -> dict[str, Any] | None:
        """The result file when it is this job's (same fingerprint); None otherwise. A damaged
        one counts as none (with a warning): the job is run again and rewrites it."""
        data = read_json(Path(self.result_file), on_damage="none", expect=dict, fix="the tuning run is scored again")
        return data if data is not None and data.get("fingerprint") == self.fingerprint() else None


def score_tuning_run(run_dir: Path, summary: dict, metric: str) -> dict[str, Any]:
    """The tune metric of a finished run, and whether it diverged (non-finite, or it ended worse
    than it started)."""
    records = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    steps = int(summary["steps"])
    if metric == "val_loss":
        score = summary.get("val_loss")
    elif metric == "best_val_loss":
        values = [r["val_loss"] for r in records if r.get("step", 0) > 0 and r.get("val_loss") is not None]
        score = min(values, default=summary.get("val_loss"))
    elif metric == "train_loss":  # the mean logged training loss over the last 10% of the steps
        values = [r["loss"] for r in records if r.get("loss") is not None and r.get("step", 0) > 0.9 * steps]
        score = sum(values) / len(values) if values else None
    else:
        raise ValueError(f"unknown tune metric {metric!r}; use one of {', '.join(TUNE_METRICS)}")
    val_loss, initial = summary.get("val_loss"), summary.get("initial_val_loss")
    finite = [v is not None and math.isfinite(v) for v in (score, val_loss)]
    diverged = not all(finite) or (initial is not None and val_loss > initial)
    return {"diverged": diverged, "score": score if finite[0] else None, "val_loss": val_loss if finite[1] else None,
            "initial_val_loss": initial, "steps": steps, "skipped_steps": summary.get("skipped_steps", 0),
            "train_time": summary.get("train_time")}


@dataclass(frozen=True, kw_only=True)
class AnalyzeJob(Job):
    """The analysis of the trained runs of one (preset, seed) group against its full-rank run and
    the full-rank runs of the other seeds (the baseline references)."""

    run_dirs: tuple[str, ...]
    reference_dir: str
    settings: dict  # AnalysisSettings fields, as in the study file
    baseline_dirs: tuple[str, ...] = ()

    def run(self) -> dict[str, Any]:
        from rankscope.analysis.pipeline import analyze_runs
        from rankscope.study.spec import settings_from_mapping

        outputs = analyze_runs(list(self.run_dirs), self.reference_dir, settings_from_mapping(self.settings),
                               baseline_references=list(self.baseline_dirs))
        return {"analysed": sorted(outputs)}

    def finished_on_disk(self) -> bool:
        return all((Path(run) / "analysis" / "meta.json").is_file() for run in self.run_dirs)


@dataclass(frozen=True, kw_only=True)
class EvalJob(Job):
    """Downstream accuracy of one run's final checkpoint."""

    run_dir: str
    step: int
    tasks: tuple[str, ...]
    limit: int
    batch_size: int
    device: str

    def run(self) -> dict[str, Any]:
        result = evaluate_run(Path(self.run_dir), self.step, list(self.tasks), self.limit, self.batch_size, self.device)
        return {"mean_acc": result.get("mean_acc")}

    def finished_on_disk(self) -> bool:
        return (Path(self.run_dir) / "eval" / f"step_{self.step:06d}.json").is_file()


def evaluate_run(run_dir: Path, step: int | None, tasks: list[str], limit: int, batch_size: int, device: str) -> dict:
    """Downstream accuracy of one checkpoint, written to RUN_DIR/eval/step_XXXXXX.json."""
    from rankscope.analysis.downstream import evaluate_model, settle_hub_mode
    from rankscope.data import prepare_data
    from rankscope.train import load_run_model
    from rankscope.train.setup import resolve_device

    settle_hub_mode(tasks)  # before the tokenizer or lm-eval import the Hugging Face libraries
    loaded = load_run_model(run_dir, step, device=resolve_device(device))
    tokenizer = prepare_data(loaded.config.data).tokenizer
    result = evaluate_model(
        loaded.model, tokenizer, tasks=tasks, batch_size=batch_size, limit=limit or None,
        device=next(loaded.model.parameters()).device, seed=loaded.config.train.seed,
        max_length=loaded.config.data.seq_len,
    )
    result["step"] = loaded.step
    write_json_atomic(Path(run_dir) / "eval" / f"step_{loaded.step:06d}.json", result)
    return result


def last_metrics_record(path: Path) -> dict | None:
    """The last complete line of a metrics.jsonl, read from its end (the file can be long)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 4096))
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written, or cut at the start of the window
    return None


# ---------------------------------------------------------------------------------------------


def execute_job(job: Job, study_dir: str | Path, *, rank: int = 0, capture_output: bool = False) -> dict[str, Any]:
    """Run `job` and record its outcome; returns the outcome.

    Only rank 0 of a multi-process (DDP) job holds the lock and writes the outcome; every rank
    logs. `capture_output` sends the process's stdout and stderr (warnings, tracebacks, native
    libraries) to the job's log while it runs; launchers whose jobs own their process leave
    that to the scheduler's log and get the log records through a file handler. A job never
    tokenizes: the study's prepare stage did, and missing shards fail the job at once.
    """
    from rankscope.data.prepare import require_prepared
    from rankscope.train.preemption import RunPreempted, clear_stop

    files = JobFiles(Path(study_dir), job.stage, job.name)
    log_path = files.log if rank == 0 else files.log.with_suffix(f".rank{rank}.log")
    clear_stop()  # a worker process runs many jobs; a stop request belongs to the one it stopped
    with _job_lock(files.lock, enabled=rank == 0), _job_log(log_path, capture_output):
        started = time.time()
        record = {"fingerprint": job.fingerprint(), "pid": os.getpid(), "host": socket.gethostname(),
                  "started": started, "log": str(files.log)}
        if rank == 0:
            files.write_outcome({**record, "state": "running"})
        log.info("=== %s: started on %s, pid %d", files.key, record["host"], record["pid"])
        try:
            with require_prepared():
                outcome = {"state": "done", "result": job.run()}
        except RunPreempted as exc:
            outcome = {"state": "preempted", "step": exc.step}
            log.info("%s: stopped on request after step %d (checkpointed)", files.key, exc.step)
        except KeyboardInterrupt:
            if rank == 0:
                files.write_outcome({**record, "state": "interrupted", "elapsed": time.time() - started})
            raise
        except Exception as exc:  # one failing job must not stop the study: record it
            log.exception("%s failed", files.key)
            outcome = {"state": "failed", "error": error_line(exc)}
        outcome = {**record, **outcome, "elapsed": time.time() - started}
        if rank == 0:
            files.write_outcome(outcome)
        log.info("=== %s: %s after %.1fs", files.key, outcome["state"], outcome["elapsed"])
        return outcome


@contextmanager
def _job_lock(path: Path, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    # No O_EXCL fallback where flock is unsupported: the job may run on another node than a
    # killed earlier attempt whose lock file would then be respected forever. The run folder's
    # own lock (train/lock.py) still refuses a second live trainer.
    lock = FileLock(path, fallback=False)
    try:
        try:
            lock.acquire(blocking=False)
        except LockedError:
            log.warning("another process is running %s (lock %s); waiting for it to finish", path.stem, path)
            lock.acquire()
    except FlockUnavailable as exc:  # a file system without flock (some Lustre/FUSE mounts)
        log.warning("cannot lock %s (%s); relying on the run folder's own lock", path, exc.strerror)
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _job_log(path: Path, capture_output: bool) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    if capture_output:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(target, 1)
        os.dup2(target, 2)
        os.close(target)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        return
    root = logging.getLogger()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(previous_level)
