"""The one command line: `rankscope COMMAND ...`, one module per command in this package.

Each command module has HELP, `add_arguments(parser)` and `run(args) -> int`. This module and
the command modules import no torch (nor anything that does) at module level, so `--help` is
quick; a command imports what it needs inside `run`. User errors (RankscopeError) become one
`error: ...` line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from rankscope.errors import RankscopeError

# In the order `rankscope --help` lists them.
COMMANDS = ("train", "export", "methods", "config", "analyze", "eval", "study", "report", "bench", "demo", "scaling")
EPILOG = """examples:
  rankscope demo --quick                      every stage on the tiny preset, in a few minutes
  rankscope train --preset tiny --method galore --steps 300
  rankscope analyze runs/galore-tiny-s0 --reference runs/full-tiny-s0
  rankscope study studies/demo.yaml --workers 2
  rankscope bench train --methods galore,loro
  rankscope config keys                       every key that --set accepts"""


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose arguments can be added on first use, plus an optional default
    sub-command.

    - `defer(add_arguments)`: the arguments are added when this parser first parses or formats
      its help, so `rankscope --help` does not build (or read the source for) every command's
      options, and `rankscope train ...` builds only train's.
    - `default_subcommand = (name, names)`: a first argument that is neither an option nor one of
      `names` means `name ARG ...` (how `rankscope scaling SPEC.yaml` keeps meaning
      `rankscope scaling run SPEC.yaml`).
    """

    default_subcommand: tuple[str, tuple[str, ...]] | None = None
    _pending = None
    _is_command = False  # a (sub-)command's parser: every argument left over is its own error

    def add_subparsers(self, **kwargs):
        action = super().add_subparsers(**kwargs)
        add_parser = action.add_parser

        def add_command(name, **options):
            parser = add_parser(name, **options)
            parser._is_command = True
            return parser

        action.add_parser = add_command
        return action

    def defer(self, add_arguments) -> None:
        self._pending = add_arguments

    def populate(self) -> Parser:
        """Add the deferred arguments now (idempotent); returns the parser."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        self.populate()
        if self.default_subcommand and args:
            name, known = self.default_subcommand
            if not args[0].startswith("-") and args[0] not in known:
                args = [name, *args]
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._is_command and not self._subparsers:
            # Said here, with this command's usage, rather than by the top-level parser: an option
            # that does not apply to the chosen command (e.g. `bench infer --steps`) names the command.
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def format_help(self) -> str:
        self.populate()
        return super().format_help()

    def format_usage(self) -> str:
        self.populate()
        return super().format_usage()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rankscope")
    except PackageNotFoundError:  # running from a checkout that is not installed
        from rankscope import __version__

        return __version__


class _VersionAction(argparse.Action):
    """--version, with the version looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(f"rankscope {_version()}\n", sys.stdout)
        parser.exit()


def command_module(name: str):
    return importlib.import_module(f"rankscope.cli.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="rankscope",
        description="Low-rank pre-training of language models: train every method in one pipeline, "
        "analyse what they learn beyond perplexity, report and benchmark.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="print rankscope's version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; each job of "
                        "`study`, `demo` and `scaling` uses 1, which gives the same numbers whatever --workers is); "
                        "also accepted after the command")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = command_module(name)
        p = sub.add_parser(name, help=module.HELP, description=(module.__doc__ or "").strip().splitlines()[0])
        p.defer(module.add_arguments)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if not sys.stderr.isatty() else "%(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command is None:
        parser.print_help()
        return 0
    if args.threads is not None and args.threads < 1:
        print(f"error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    # study, demo and scaling run their jobs in worker processes, which take --threads themselves;
    # bench sets it itself.
    if args.threads is not None and args.command not in ("study", "demo", "scaling", "bench"):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except RankscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused (permissions, a full disk): say where, not a traceback
        if args.verbose:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}; rerun with -v for the details", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "build_parser", "main"]
