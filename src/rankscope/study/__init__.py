"""Studies: a grid of methods x presets x seeds, trained, analysed, evaluated and reported.

- spec.py      the study file (typed dataclasses) and the plan of its runs
- jobs.py      the jobs (train a run, analyse a group, evaluate a run) and `execute_job`
- launch/      where jobs run: local worker processes, submitit-local, SLURM
- engine.py    the driver loop: skip finished jobs, follow running ones, submit the rest
- stages.py    `run_study`: the stages in order
- status.py    what the study folder records (status.json, jobs.json, outcomes, logs)
- progress.py  the live view of every run
- predict.py   the predictor stage
"""

from rankscope.study.jobs import AnalyzeJob, EvalJob, Job, TrainJob, evaluate_run, execute_job
from rankscope.study.launch import LAUNCHERS, LaunchOptions
from rankscope.study.spec import (
    REFERENCE_METHOD,
    STAGES,
    EvalSpec,
    GridSpec,
    PlannedRun,
    PredictorSpec,
    StudySpec,
    analysis_settings,
    load_study,
    plan_runs,
    run_name,
    study_from_dict,
)
from rankscope.study.stages import run_study
from rankscope.study.status import StudyStatus

__all__ = [
    "LAUNCHERS", "REFERENCE_METHOD", "STAGES", "AnalyzeJob", "EvalJob", "EvalSpec", "GridSpec", "Job",
    "LaunchOptions", "PlannedRun", "PredictorSpec", "StudySpec", "StudyStatus", "TrainJob",
    "analysis_settings", "evaluate_run", "execute_job", "load_study", "plan_runs",
    "run_name", "run_study", "study_from_dict",
]
