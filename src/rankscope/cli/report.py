"""`rankscope report`: tables and figures of a study folder."""

from __future__ import annotations

import argparse

from rankscope.cli._common import add_threads_option

HELP = "tables and figures of a study folder: report.md, report.html, figures/, tables/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study_dir", help="the --out folder of `rankscope study`")
    parser.add_argument("--browser-check", action="store_true",
                        help="open report.html in headless Chromium: images load, no console error, every in-page link "
                             "resolves (needs the browser extra); exit 1 on a problem")
    parser.add_argument("--screenshot", metavar="PNG",
                        help="with the browser check: save the first screen (1400 x 1000) here")
    add_threads_option(parser)


def run(args: argparse.Namespace) -> int:
    from rankscope.report import build_report

    out = build_report(args.study_dir)
    print(f"report: {out / 'report.html'} (also report.md, figures/, tables/)")
    if args.browser_check or args.screenshot:
        from rankscope.report.browser import check_report

        check = check_report(out / "report.html", screenshot=args.screenshot)
        print(f"browser check: {check.summary()}" + (f"; first screen: {args.screenshot}" if args.screenshot else ""))
        return 0 if check.ok else 1
    return 0
