"""`rankscope demo`: the packaged demo study, end to end on the embedded corpus."""

from __future__ import annotations

import argparse

from rankscope.cli._common import (
    add_allow_failures,
    add_launch_arguments,
    add_threads_option,
    failure_status,
    launch_options,
    print_results,
    print_study_end,
)
from rankscope.paths import check_output_folder

HELP = "the demo study: every method on the tiny preset, analysed and reported"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a shorter variant that checks every stage in a few minutes (fewer methods and steps)")
    parser.add_argument("--out", default="rankscope-demo", help="where the study and its report go (default ./rankscope-demo)")
    parser.add_argument("--device", help="auto, cpu, cuda (default: the demo study's)")
    add_allow_failures(parser)
    add_launch_arguments(parser, cluster=True)
    add_threads_option(parser)


def run(args: argparse.Namespace) -> int:
    from rankscope.demo import run_demo

    check_output_folder(args.out, "--out")
    result = run_demo(args.out, quick=args.quick, device=args.device, launch=launch_options(args))
    if result.get("plan"):
        print(result["plan"])
        return 0
    print_results(args.out)
    print(f"demo finished in {result['wall_time'] / 60:.1f} min")
    print_study_end(result)
    return failure_status(result["failed"], args)
