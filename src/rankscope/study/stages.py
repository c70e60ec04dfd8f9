"""`run_study`: the stages of a study in order, each re-runnable alone.

prepare tokenizes the study's data into the token cache in the driver, before any job: a GPU job
never waits on tokenization (or dies in it at its time limit), and a job that finds its shards
missing fails at once (rankscope.data.prepare.require_prepared). It runs whenever a job stage
does, for the runs that still have work; `--stage prepare` runs it alone (on a CPU allocation, say).
tune (study/tune.py: per-method hyper-parameter search whose choices the train stage uses), train, analyze (one job per preset/seed group, against its full-rank run) and eval (one job per
run) are jobs run by a launcher (study/launch/); predict and report only read tables and run in
the driver. Finished work is skipped and interrupted work resumes (the trainer, the analysis and
the driver all key their work on disk). A failing run is recorded in status.json and the study
goes on; the report lists it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from rankscope.config import DataConfig, config_to_dict, dataclass_from_dict
from rankscope.errors import ConfigError, DriverLockedError, RankscopeError, did_you_mean
from rankscope.locking import FileLock
from rankscope.study.board import StudyBoard
from rankscope.study.engine import run_jobs
from rankscope.study.jobs import AnalyzeJob, EvalJob, Job, TrainJob
from rankscope.study.launch import Launcher, LaunchOptions
from rankscope.study.launch.factory import make_launcher
from rankscope.study.predict import run_predict_stage
from rankscope.study.regime_record import REGIME_FILE, write_regime
from rankscope.study.spec import (
    REFERENCE_METHOD,
    STAGES,
    EvalSpec,
    PlannedRun,
    StudySpec,
    analysis_settings,
    load_study,
    plan_runs,
)
from rankscope.study.status import StudyStatus
from rankscope.study.tune import load_chosen, plan_tuning, run_tune, tune_jobs

log = logging.getLogger("rankscope.study")

JOB_STAGES = ("tune", "train", "analyze", "eval")


def run_study(study_file: str | Path | None, out_dir: str | Path, stages: tuple[str, ...] = STAGES,
              spec: StudySpec | None = None, launch: LaunchOptions | None = None) -> dict[str, Any]:
    """Run the stages of a study; returns {"runs", "failed", "report", "out"} (and "plan" for a dry run)."""
    refuse_distributed_driver()
    if spec is None:
        spec = load_study(study_file)
    for stage in stages:
        if stage not in STAGES:
            raise ConfigError(f"unknown study stage {stage!r}{did_you_mean(stage, STAGES)}")
    planned = plan_runs(spec)
    cells = plan_tuning(spec)
    analysis_settings(spec)
    if spec.eval.tasks:
        from rankscope.analysis.downstream import expand_task_names

        expand_task_names(spec.eval.tasks)  # unknown task names fail here, before training
    launch = launch or LaunchOptions()
    launch.validate()
    # Absolute: a job resolves its paths on a compute node, whose working directory is the submit
    # directory only by default (--slurm-extra chdir=..., a site prolog).
    out = Path(out_dir).expanduser().resolve()
    runs_dir = out / "runs"
    names = [p.name for p in planned]
    if cells and "tune" not in stages:
        # Training without the tune stage's results (missing, or of another tune: block) fails here.
        planned = _plan_with_choices(spec, cells, out, strict="train" in stages)
    has_jobs = any(s in stages for s in JOB_STAGES)
    launcher = make_launcher(launch, out, spec.name, largest_model(planned)) if has_jobs else None
    if launch.dry_run:
        return {"runs": names, "failed": [], "report": None, "out": out,
                "plan": describe_study(planned, spec, stages, out, launcher, cells)}

    runs_dir.mkdir(parents=True, exist_ok=True)
    with _driver_lock(out):
        (out / "study.yaml").write_text(yaml.safe_dump(config_to_dict(spec), sort_keys=False))
        status = StudyStatus(out / "status.json")
        if has_jobs or "prepare" in stages:
            prepare_stage(_data_to_prepare(planned, cells, spec, stages, status, out))
        if launcher is not None:
            try:
                with StudyBoard(f"study {spec.name} ({launcher.name})") as board:
                    if "tune" in stages and cells:
                        run_tune(spec, cells, out, launcher, board)
                        planned = _plan_with_choices(spec, cells, out, strict=True)
                    if "train" in stages:
                        # Before training: the record of how these runs are set up is what the
                        # report reads, whatever happens to the study file later.
                        write_regime(out, planned, spec)
                        run_jobs(train_jobs(planned, runs_dir), launcher, out, status, board)
                    if "analyze" in stages:
                        run_jobs(analyze_jobs(planned, runs_dir, status, spec), launcher, out, status, board)
                    if "eval" in stages:
                        run_jobs(eval_jobs(planned, runs_dir, status, spec.eval), launcher, out, status, board)
            except KeyboardInterrupt:
                log.warning("interrupted: %s", launcher.interrupt())
                raise
            finally:
                launcher.close()
        if "report" in stages and not (out / REGIME_FILE).is_file():
            write_regime(out, planned, spec)  # runs trained before regime.json existed
        if "predict" in stages:
            run_predict_stage(planned, runs_dir, out, status, spec.predictor)
        report_path = None
        if "report" in stages:
            from rankscope.report import build_report

            report_path = build_report(out)
        failed = [p.name for p in planned if status.failed(p.name)]
    return {"runs": names, "failed": failed, "report": report_path, "out": out}


def _plan_with_choices(spec: StudySpec, cells, out: Path, strict: bool) -> list[PlannedRun]:
    """The runs with the tune stage's choices. Without them (missing, or of another tune: block)
    training refuses (`strict`); analysis, eval and the report read only runs that exist and go on."""
    try:
        return plan_runs(spec, load_chosen(spec, cells, out))
    except ConfigError as exc:
        if strict:
            raise
        log.warning("%s", exc)
        return plan_runs(spec)


def refuse_distributed_driver() -> None:
    """A study driver is one process. Under torchrun every rank would be a driver of the same
    folder (ranks 1+ stop at the driver lock, and torchrun then kills rank 0)."""
    world_size = os.environ.get("WORLD_SIZE", "1").strip()
    if world_size.isdigit() and int(world_size) > 1:
        raise RankscopeError(
            f"`rankscope study` runs one driver, not one per torchrun rank (WORLD_SIZE={world_size}): run it without "
            "torchrun; it already runs one worker per GPU, and a multi-GPU run goes through "
            "--launcher slurm --slurm-gpus-per-run N")


def largest_model(planned: list[PlannedRun]) -> int | None:
    """Parameters of the study's largest model (closed form, nothing is built): the SLURM
    launcher scales its signal delay and memory request to it."""
    import dataclasses

    from rankscope.models import get_preset
    from rankscope.models.llama import count_parameters

    sizes = []
    for run in planned:
        shape = dataclasses.replace(get_preset(run.config.model.preset), **run.config.model.overrides)
        sizes.append(count_parameters(shape))
    return max(sizes, default=None)


def _data_to_prepare(planned: list[PlannedRun], cells, spec: StudySpec, stages: tuple[str, ...], status: StudyStatus,
                     out: Path) -> list[DataConfig]:
    """The data configs the requested job stages still need: every run's for `--stage prepare`,
    else those of runs with a requested stage not yet done (a finished study whose token cache
    was cleaned up is not tokenized again to rebuild its report)."""
    configs = []
    for run in planned:
        if "prepare" in stages or any(s in stages and status.state(run.name, s) != "done" for s in ("train", "analyze", "eval")):
            configs.append(run.config.data)
    if cells and ("tune" in stages or "prepare" in stages):
        configs += [dataclass_from_dict(DataConfig, job.config["data"], "data") for job in tune_jobs(list(cells), out / "tune", spec)]
    return configs


def prepare_stage(configs: list[DataConfig]) -> None:
    """Tokenize each distinct data config into the token cache (a cached one is only verified)."""
    from rankscope.data import prepare_data

    done = set()
    for cfg in configs:
        key = json.dumps(config_to_dict(cfg), sort_keys=True)
        if key in done:
            continue
        prepared = prepare_data(cfg)
        log.info("prepare: %s: %d training sequences of %d tokens in %s", cfg.source, prepared.train.n_sequences,
                 prepared.seq_len, prepared.shard_dir)
        done.add(key)


def train_jobs(planned: list[PlannedRun], runs_dir: Path) -> list[Job]:
    return [TrainJob(stage="train", name=run.name, runs=(run.name,), run_dir=str(runs_dir / run.name),
                     config=config_to_dict(run.config)) for run in planned]


def _trained(run: PlannedRun, runs_dir: Path, status: StudyStatus) -> bool:
    return status.state(run.name, "train") == "done" and (runs_dir / run.name / "summary.json").is_file()


def _groups(planned: list[PlannedRun]) -> dict[tuple[str, int], list[PlannedRun]]:
    groups: dict[tuple[str, int], list[PlannedRun]] = {}
    for run in planned:
        groups.setdefault((run.preset, run.seed), []).append(run)
    return groups


def analyze_jobs(planned: list[PlannedRun], runs_dir: Path, status: StudyStatus | None, spec: StudySpec) -> list[Job]:
    """One job per (preset, seed) group: its trained runs against its full-rank run, and against
    the trained full-rank runs of the preset's other seeds (cross-seed comparisons and the
    full-rank seed baseline). A job writes only into its own runs' folders and reads the other
    seeds' checkpoints; each seed pair of full-rank runs is computed once, by the job of its lower
    seed (rankscope.analysis.context.pair_owner), so the jobs can run in any order or in parallel.

    Without `status` (a dry run) every run counts as trained. A group whose full-rank run did
    not finish training gets no job; its runs are recorded as failed with the reason.
    """
    jobs = []
    references = [r for r in planned if r.method == REFERENCE_METHOD and (status is None or _trained(r, runs_dir, status))]
    for (preset, seed), group in _groups(planned).items():
        reference = next(r for r in group if r.method == REFERENCE_METHOD)
        if status is not None and not _trained(reference, runs_dir, status):
            for run in group:
                status.set(run.name, "analyze", "failed", f"reference run {reference.name} did not finish training")
            continue
        ready = [r for r in group if status is None or _trained(r, runs_dir, status)]
        baselines = [r for r in references if r.preset == preset and r.seed != seed]
        jobs.append(AnalyzeJob(
            stage="analyze", name=f"{preset}-s{seed}", runs=tuple(r.name for r in ready),
            run_dirs=tuple(str(runs_dir / r.name) for r in ready), reference_dir=str(runs_dir / reference.name),
            baseline_dirs=tuple(str(runs_dir / r.name) for r in baselines), settings=dict(spec.analysis),
        ))
    return jobs


def eval_jobs(planned: list[PlannedRun], runs_dir: Path, status: StudyStatus | None, spec: EvalSpec) -> list[Job]:
    return [
        EvalJob(stage="eval", name=run.name, runs=(run.name,), run_dir=str(runs_dir / run.name),
                step=run.config.train.steps, tasks=tuple(spec.tasks), limit=spec.limit,
                batch_size=spec.batch_size, device=spec.device)
        for run in planned if status is None or _trained(run, runs_dir, status)
    ]


def describe_study(planned: list[PlannedRun], spec: StudySpec, stages: tuple[str, ...], out: Path,
                   launcher: Launcher | None, cells=()) -> str:
    """What a dry run prints: per job stage, how its jobs would be launched (sbatch lines for SLURM)."""
    lines = [f"study {spec.name}: {len(planned)} runs into {out} (dry run: nothing is written or submitted)"]
    if "prepare" in stages or any(stage in stages for stage in JOB_STAGES):
        sources = sorted({run.config.data.source for run in planned})
        lines.append(f"stage prepare: in the driver, before any job: tokenize {', '.join(sources)} into the token cache "
                     "($RANKSCOPE_CACHE, default ~/.cache/rankscope)")
    runs_dir = out / "runs"
    builders = {"tune": lambda: tune_jobs(list(cells), out / "tune", spec),  # the first round; edges may add more
                "train": lambda: train_jobs(planned, runs_dir),
                "analyze": lambda: analyze_jobs(planned, runs_dir, None, spec),
                "eval": lambda: eval_jobs(planned, runs_dir, None, spec.eval)}
    for stage in JOB_STAGES:
        if stage in stages and (stage != "tune" or cells):
            lines.append(launcher.describe(stage, builders[stage]()))
    lines += [f"stage {stage}: in the driver" for stage in stages if stage not in (*JOB_STAGES, "prepare")]
    return "\n".join(lines)


@contextmanager
def _driver_lock(out: Path) -> Iterator[None]:
    """One driver per study folder: two would submit the same jobs twice."""
    folder = str(out).replace("{", "{{").replace("}", "}}")
    # flock, or on a file system without it an exclusive lock file whose holder, gone from this
    # host, is stale (see rankscope.locking): no longer unguarded there.
    lock = FileLock(out / ".driver.lock", blocking=False, error=DriverLockedError,
                    message=f"another `rankscope study` (pid {{pid}}) is driving {folder}; wait for it or stop it "
                            "first (held by {holder}; if it is gone, delete {path})")
    with lock:
        yield
