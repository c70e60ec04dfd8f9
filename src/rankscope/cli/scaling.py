"""`rankscope scaling run SPEC.yaml | fit TABLE.csv`: scaling laws.

`run` trains a size x token grid per method and fits L(N, D) = E + A/N^alpha + B/D^beta to it;
`fit` fits a table someone else made. The old form `rankscope scaling SPEC.yaml` still means
`scaling run SPEC.yaml`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rankscope.cli._common import (
    add_allow_failures,
    add_launch_arguments,
    add_threads_option,
    failure_status,
    field_help,
    launch_options,
)
from rankscope.errors import RankscopeError
from rankscope.paths import check_output_folder

HELP = ("scaling laws: `scaling run SPEC.yaml` trains a size x token grid per method and fits it; "
        "`scaling fit TABLE.csv` fits L(N, D) = E + A/N^alpha + B/D^beta to a table")
FIT = ("rankscope.scaling.fit", "FitSettings")
SUBCOMMANDS = ("run", "fit")


def _add_fit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", type=int, default=None,
                        help=field_help(*FIT, "bootstrap", "bootstrap resamples for the confidence intervals, 0 = none"))
    parser.add_argument("--seed", type=int, default=None, help=field_help(*FIT, "seed", "seed of the bootstrap"))
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="initial values of a, b, e, alpha or beta for the L-BFGS starts, replacing Hoffmann et al.'s "
                             "(e.g. --grid alpha=0,1,2; repeatable); fewer starts fit faster")
    add_threads_option(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # `rankscope scaling SPEC.yaml` (the form before `run` existed) is read as `scaling run SPEC.yaml`.
    parser.default_subcommand = ("run", SUBCOMMANDS)
    sub = parser.add_subparsers(dest="scaling_command", metavar="{run,fit}", required=True)
    p = sub.add_parser("run", help="train the spec's size x token grid per method, then fit it "
                       "(`rankscope scaling SPEC.yaml` means the same)")
    p.defer(_add_run_arguments)
    p.set_defaults(scaling_func=run_spec)
    p = sub.add_parser("fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta to a table")
    p.defer(_add_fit_arguments)
    p.set_defaults(scaling_func=run_fit)


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC.yaml", help="a scaling spec (see studies/scaling-small.yaml)")
    p.add_argument("--out", help="output folder (default scaling-out/<spec name>)")
    _add_fit_options(p)
    add_allow_failures(p)
    add_launch_arguments(p, cluster=True)


def _add_fit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", nargs="?", metavar="TABLE.csv", help="a CSV with columns method, params, tokens, loss")
    p.add_argument("--out", help="output folder (default <TABLE>-fit next to the CSV)")
    _add_fit_options(p)


def _fit_overrides(args: argparse.Namespace) -> dict:
    overrides = {k: v for k, v in (("bootstrap", args.bootstrap), ("seed", args.seed)) if v is not None}
    if args.grid:
        grid = {}
        for item in args.grid:
            key, _, values = item.partition("=")
            try:
                grid[key.strip()] = [float(v) for v in values.split(",") if v.strip()]
            except ValueError:
                raise RankscopeError(f"--grid takes KEY=V1,V2,... with numbers (e.g. alpha=0,0.5,1), got {item!r}") from None
        overrides["grid"] = grid
    return overrides


def _print_fits(result: dict) -> None:
    from rankscope.report.stats import format_number

    def shown(value, ci) -> str:
        return format_number(value) + ("" if ci is None or ci[0] is None else f" [{format_number(ci[0])}, {format_number(ci[1])}]")

    for method, fit in result["fits"].items():
        optimal = result["compute_optimal"][method]
        print(f"{method}: alpha {shown(fit['alpha'], fit['ci']['alpha'])}, beta {shown(fit['beta'], fit['ci']['beta'])}, "
              f"E {shown(fit['E'], fit['ci']['E'])}; N* ~ C^{shown(optimal['a'], optimal['a_ci'])}, "
              f"D* ~ C^{shown(optimal['b'], optimal['b_ci'])}")
    out = Path(result["out"])
    print(f"fits: {out / 'fits.json'}; report: {out / 'report.html'} (also report.md, figures/, frontier.csv)")


def run_fit(args: argparse.Namespace) -> int:
    from rankscope.scaling.analyze import analyze_table
    from rankscope.scaling.fit import FitSettings, read_table

    if not args.table:
        raise RankscopeError("usage: rankscope scaling fit TABLE.csv (one CSV with columns method, params, tokens, loss)")
    settings = FitSettings(**_fit_overrides(args))
    settings.validate()
    table = read_table(args.table)
    out = args.out or str(Path(args.table).with_suffix("")) + "-fit"
    check_output_folder(out, "--out")
    result = analyze_table(table, out, settings, title=Path(args.table).stem)
    _print_fits(result)
    return 0


def run_spec(args: argparse.Namespace) -> int:
    from rankscope.scaling.runner import load_spec, run_scaling

    overrides = _fit_overrides(args)
    spec = load_spec(args.spec)
    for key, value in overrides.items():
        setattr(spec.fit, key, value)
    spec.fit.validate()
    out = args.out or f"scaling-out/{Path(args.spec).stem}"
    check_output_folder(out, "--out")
    result = run_scaling(None, out, spec=spec, launch=launch_options(args))
    if result.get("plan"):
        print(result["plan"])
        return 0
    _print_fits(result)
    if result["failed"]:
        print(f"{len(result['failed'])} runs failed and were left out of the fit: {', '.join(result['failed'])}")
    return failure_status(result["failed"], args)


def run(args: argparse.Namespace) -> int:
    return args.scaling_func(args)
