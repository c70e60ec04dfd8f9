"""`rankscope train`: train (or resume) one run.

The flags are shortcuts for keys of the run config (rankscope.config.RunConfig); their help and
defaults come from the dataclasses there. Every other key is reachable with --set.
"""

from __future__ import annotations

import argparse
import os

from rankscope.cli._common import (
    add_threads_option,
    escape_help,
    presets,
    run_config_field,
    scalar_type,
)
from rankscope.cli._fields import shown

HELP = "train (or resume) one run"

# flag -> run-config key. A flag's default is None: the config file, then the dataclass default applies.
CONFIG_FLAGS: dict[str, str] = {
    "--preset": "model.preset",
    "--method": "method.name",
    "--steps": "train.steps",
    "--seed": "train.seed",
    "--data": "data.source",
    "--batch-size": "train.batch_size",
    "--micro-batch-size": "train.micro_batch_size",
    "--seq-len": "data.seq_len",
    "--lr": "optim.lr",
    "--eval-every": "train.eval_every",
    "--checkpoint-every": "train.checkpoint_every",
    "--checkpoint-steps": "train.checkpoint_steps",
    "--device": "train.device",
    "--precision": "train.precision",
}


def _dest(key: str) -> str:
    return key.replace(".", "__")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, the CONFIG_FLAGS and --set: how a command line names a run config."""
    parser.add_argument("--config", help="YAML file with the run config (sections model, data, method, optim, train; "
                        "`rankscope config keys` lists every key)")
    for flag, key in CONFIG_FLAGS.items():
        doc = run_config_field(key)
        text = doc.comment or key
        if key == "model.preset":
            text = "model preset: " + ", ".join(presets())
        elif key == "method.name":
            text = "training method; `rankscope methods` lists them"
        default = "" if doc.default is None else f"default {shown(doc.default)}; "
        kind = scalar_type(doc.type)
        parser.add_argument(flag, dest=_dest(key), default=None, type=kind if kind in (int, float) else None,
                            metavar=flag.lstrip("-").upper().replace("-", "_"),
                            help=escape_help(f"{text} ({default}config key {key})"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set method.rank=64 (repeatable; `rankscope config keys` "
                        "lists them)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", help="run directory (default runs/<method>-<preset>-s<seed>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again from step 0 when --out holds a run of a different config (removes only "
                        "that run's own files; other folders are never cleared)")
    add_threads_option(parser)


def config_from_args(args: argparse.Namespace):
    """The RunConfig a `train` command line names: --config, then --set, then the flags."""
    from rankscope.config import build_config, load_yaml

    base = load_yaml(args.config) if args.config else {}
    fields = {key: getattr(args, _dest(key)) for key in CONFIG_FLAGS.values()}
    method = fields["method.name"]
    if method and isinstance(base.get("method"), dict) and base["method"].get("name") not in (None, method):
        # Settings in the file belong to the file's method; --method starts from the new one's defaults.
        base = dict(base)
        base["method"] = {}
    return build_config(base, args.overrides, **fields)


def run(args: argparse.Namespace) -> int:
    from rankscope.train import train

    cfg = config_from_args(args)
    out = args.out or f"runs/{cfg.method.name}-{cfg.model.preset}-s{cfg.train.seed}"
    summary = train(cfg, out, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        initial = summary.get("initial_val_ppl")
        before = f" (initial {initial:.2f})" if initial else ""
        print(f"{out}: val loss {summary['val_loss']:.4f}, val ppl {summary['val_ppl']:.2f}{before}, "
              f"{summary['steps']} steps, {summary['wall_time']:.1f}s")
    return 0
