"""`make_launcher`: the launcher a study's options ask for (imported only when it is used)."""

from __future__ import annotations

from pathlib import Path

from rankscope.study.launch import Launcher, LaunchOptions


def make_launcher(options: LaunchOptions, study_dir: Path, study_name: str, model_params: int | None = None) -> Launcher:
    """`model_params`: the study's largest model, which the SLURM launcher sizes its defaults to."""
    options.validate()
    if options.launcher == "local":
        from rankscope.study.launch.local import LocalLauncher

        return LocalLauncher(study_dir, options)
    from rankscope.study.launch.cluster import SubmititLauncher

    return SubmititLauncher(study_dir, options, study_name, model_params)
