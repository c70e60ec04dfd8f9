"""The study driver's loop: hand a stage's jobs to a launcher and follow them to the end.

For each job it first looks at what the study folder already knows:
- a `done` outcome of the same job (same fingerprint) whose results are on disk: nothing to do;
- a job id in jobs.json that the launcher still sees queued or running: follow it, don't resubmit;
- a job the scheduler still has although no record names it (a driver died between submitting
  it and recording its id; `Launcher.find_submitted`): record it and follow it;
- otherwise: submit it (again). Its id goes to jobs.json as soon as the scheduler has taken it.
It then polls the launcher until every job has ended and records each job's outcome in
status.json for the runs it covers. A job that fails (or whose process dies) is recorded and the
others go on. The driver holds no state of its own that is not on disk, so it can be stopped and
started again at any time; the tune stage calls it once per round of its search.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rankscope.study.board import StudyBoard
from rankscope.study.jobs import Job
from rankscope.study.launch import Handle, Launcher
from rankscope.study.status import JobFiles, JobRecords, StudyStatus

log = logging.getLogger("rankscope.study")


def run_jobs(jobs: list[Job], launcher: Launcher, study_dir: Path, status: StudyStatus, board: StudyBoard) -> dict[str, dict]:
    """Run the jobs (all of one stage) to their end; returns {job name: outcome}."""
    if not jobs:
        return {}
    stage = jobs[0].stage
    records = JobRecords(study_dir / "jobs.json")
    outcomes: dict[str, dict] = {}
    followed: dict[str, tuple[Job, Handle]] = {}
    to_submit: list[Job] = []
    for job in jobs:
        files = JobFiles(study_dir, job.stage, job.name)
        outcome = files.read_outcome()
        if (outcome and outcome.get("state") == "done" and outcome.get("fingerprint") == job.fingerprint()
                and job.finished_on_disk()):
            outcomes[job.name] = outcome
            _record(job, outcome, study_dir, status)
            board.set(job, "done", "earlier")
            continue
        record = records.get(files.key)
        handle = launcher.attach(record) if record else None
        if handle is not None:
            log.info("%s: following job %s, submitted by an earlier driver", files.key, record.get("job_id"))
            followed[job.name] = (job, handle)
            board.set(job, "running")
        else:
            files.outcome.unlink(missing_ok=True)  # an older attempt's outcome must not be read as this one's
            to_submit.append(job)
            board.set(job, "queued")

    def remember(job: Job, record: dict | None) -> None:
        if record is not None:
            records.set(JobFiles(study_dir, job.stage, job.name).key, record)

    if to_submit:
        for name, handle in launcher.find_submitted(stage, to_submit).items():
            job = next(j for j in to_submit if j.name == name)
            log.info("%s/%s: following job %s, submitted by an earlier driver that did not record it",
                     stage, name, (handle.record or {}).get("job_id"))
            remember(job, handle.record)
            followed[name] = (job, handle)
            board.set(job, "running")
        to_submit = [job for job in to_submit if job.name not in followed]
    for name, handle in launcher.submit(stage, to_submit, on_submitted=remember).items():
        followed[name] = (next(j for j in to_submit if j.name == name), handle)

    while followed:
        launcher.poll()
        for name, (job, handle) in list(followed.items()):
            files = JobFiles(study_dir, job.stage, job.name)
            record = handle.record
            if record is not None and records.get(files.key) != record:
                records.set(files.key, record)
            if not handle.finished():
                current = files.read_outcome()
                if current and current.get("state") == "running":
                    board.set(job, "running")
                continue
            outcome = files.read_outcome()
            if outcome is None or outcome.get("state") in ("running", "interrupted", None):
                outcome = {"state": "failed", "error": handle.failure() or "the job ended without recording an outcome",
                           "log": str(files.log)}
            elif outcome["state"] == "preempted":
                # Checkpointed and stopped, but the job ended instead of being requeued: say why
                # (submitit's reason: the requeue limit, a refused `scontrol requeue`, ...).
                reason = handle.failure() or "not requeued"
                outcome = {**outcome, "state": "failed", "error": (
                    f"stopped after step {outcome.get('step')} and not resumed ({reason}); "
                    "run the study again to continue from that checkpoint")}
            outcomes[name] = outcome
            _record(job, outcome, study_dir, status)
            board.set(job, outcome["state"], _detail(outcome))
            del followed[name]
        board.refresh()
        if followed:
            time.sleep(launcher.poll_interval)
    return outcomes


def _record(job: Job, outcome: dict, study_dir: Path, status: StudyStatus) -> None:
    state = "done" if outcome["state"] == "done" else "failed"
    log_path = outcome.get("log")
    if log_path:
        try:
            log_path = str(Path(log_path).relative_to(study_dir))
        except ValueError:
            pass
    for run in job.runs:
        status.set(run, job.stage, state, outcome.get("error") if state == "failed" else None, log_path)


def _detail(outcome: dict) -> str:
    if outcome["state"] == "failed":
        return str(outcome.get("error", ""))
    result = outcome.get("result") or {}
    if result.get("diverged"):
        return f"diverged, {outcome.get('elapsed', 0):.0f}s"
    if result.get("val_ppl") is not None:
        return f"val ppl {result['val_ppl']:.2f}, {outcome.get('elapsed', 0):.0f}s"
    if result.get("score") is not None:
        return f"score {result['score']:.4f}, {outcome.get('elapsed', 0):.0f}s"
    if result.get("mean_acc") is not None:
        return f"mean acc {result['mean_acc']:.3f}, {outcome.get('elapsed', 0):.0f}s"
    return f"{outcome.get('elapsed', 0):.0f}s"
