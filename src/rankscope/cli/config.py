"""`rankscope config keys`: every key that a run config (YAML, `--set KEY=VALUE`) accepts.

Walks the RunConfig dataclasses of rankscope.config: each key with its type, default and the
comment written next to it in the source. `--method NAME` adds that method's own settings
(method.*, defaults for --preset); `--analysis` lists the keys of `analyze --set` and a study's
analysis: block instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from rankscope.cli._common import (
    RUN_CONFIG_MODULE,
    RUN_CONFIG_SECTIONS,
    add_threads_option,
)
from rankscope.cli._fields import UNKNOWN, dataclass_fields

HELP = "the config keys that --config files and --set accept (`config keys`), with type, default and help"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="config_command", metavar="{keys}", required=True)
    p = sub.add_parser("keys", help="list every config key with its type, default and help")
    p.add_argument("--method", help="also the settings of this method (method.*), with their defaults for --preset")
    p.add_argument("--preset", default="tiny", help="preset for the method's defaults (default tiny)")
    p.add_argument("--analysis", action="store_true",
                   help="the analysis settings instead (keys of `rankscope analyze --set` and of a study's analysis: block)")
    add_threads_option(p)


def _shown(value) -> str:
    if value is UNKNOWN:
        return "?"
    if isinstance(value, str):
        return repr(value) if value == "" else value
    return repr(value) if isinstance(value, (list, tuple, dict)) else str(value)


def run_config_keys() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every key of RunConfig (method.name only, of the method section)."""
    from rankscope import config

    rows = []
    for section, cls_name in RUN_CONFIG_SECTIONS.items():
        cls = getattr(config, cls_name)
        docs = dataclass_fields(RUN_CONFIG_MODULE, cls_name)
        hints = typing.get_type_hints(cls)
        instance = cls()
        for f in dataclasses.fields(cls):
            if section == "method" and f.name == "settings":
                continue
            help_text = f.metadata.get("help") or (docs[f.name].comment if f.name in docs else "")
            choices = config.CHOICES.get(f"{section}.{f.name}")
            if choices and help_text.find(" | ") < 0:
                help_text = (help_text + "; " if help_text else "") + " | ".join(choices)
            rows.append((f"{section}.{f.name}", docs[f.name].type if f.name in docs else str(hints[f.name]),
                         _shown(getattr(instance, f.name)), help_text))
    return rows


def method_keys(method: str, preset: str) -> list[tuple[str, str, str, str]]:
    from rankscope import methods
    from rankscope.models import get_preset

    cls = methods.get(method)
    settings = cls.default_settings(preset, get_preset(preset))
    settings_cls = type(settings)
    try:
        docs = dataclass_fields(settings_cls.__module__, settings_cls.__name__)
    except (ValueError, OSError):
        docs = {}
    rows = []
    for f in dataclasses.fields(settings_cls):
        doc = docs.get(f.name)
        rows.append((f"method.{f.name}", doc.type if doc else str(f.type), _shown(getattr(settings, f.name)),
                     doc.comment if doc else ""))
    return rows


def analysis_keys() -> list[tuple[str, str, str, str]]:
    docs = dataclass_fields("rankscope.analysis.settings", "AnalysisSettings")
    return [(name, doc.type, _shown(doc.default), doc.comment) for name, doc in docs.items()]


def print_rows(rows: list[tuple[str, str, str, str]]) -> None:
    if not rows:
        print("(no keys: rankscope's source files are not installed here)")
        return
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    print(f"{'KEY':<{widths[0]}}  {'TYPE':<{widths[1]}}  {'DEFAULT':<{widths[2]}}  HELP")
    for key, kind, default, help_text in rows:
        print(f"{key:<{widths[0]}}  {kind:<{widths[1]}}  {default:<{widths[2]}}  {help_text}".rstrip())


def run(args: argparse.Namespace) -> int:
    if args.analysis:
        print_rows(analysis_keys())
        return 0
    rows = run_config_keys()
    if args.method:
        rows += method_keys(args.method, args.preset)
    print_rows(rows)
    if not args.method:
        print("method.*: the chosen method's settings; `rankscope config keys --method NAME` lists them "
              "(and `rankscope methods` their defaults)")
    return 0
