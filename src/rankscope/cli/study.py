"""`rankscope study`: run a study file (tune, train, analyze, eval, predict, report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rankscope.cli._common import (
    add_allow_failures,
    add_launch_arguments,
    add_threads_option,
    constant,
    failure_status,
    launch_options,
    print_results,
    print_study_end,
)
from rankscope.paths import check_output_folder

HELP = "run a study: tune, train, analyze, eval, predict, report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    stages = constant("rankscope.study.spec", "STAGES", ())
    parser.add_argument("study_file", help="study YAML (see studies/)")
    parser.add_argument("--out", help="study folder (default studies-out/<file name>)")
    parser.add_argument("--stage", help=f"comma-separated stages to run: {', '.join(stages)} "
                        "(default all; tune does nothing without a tune: block)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="set a run-config key for every run of the study (in its base: block; the file's "
                        "preset and method overrides still apply), e.g. --set train.parallel=fsdp (repeatable)")
    add_allow_failures(parser)
    add_launch_arguments(parser, cluster=True)
    add_threads_option(parser)


def run(args: argparse.Namespace) -> int:
    from rankscope.config import load_yaml
    from rankscope.study import STAGES, run_study, study_from_dict
    from rankscope.study.spec import set_base_keys

    stages = tuple(args.stage.split(",")) if args.stage else STAGES
    out = args.out or f"studies-out/{Path(args.study_file).stem}"
    check_output_folder(out, "--out")
    spec = study_from_dict(set_base_keys(load_yaml(args.study_file), args.overrides)) if args.overrides else None
    result = run_study(args.study_file, out, stages, spec=spec, launch=launch_options(args))
    if result.get("plan"):
        print(result["plan"])
        return 0
    if "report" in stages:
        print_results(out)
    print_study_end(result)
    return failure_status(result["failed"], args)
