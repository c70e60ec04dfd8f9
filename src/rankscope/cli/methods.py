"""`rankscope methods`: the methods, their settings and optimizer defaults, or their memory."""

from __future__ import annotations

import argparse
import sys

from rankscope.cli._common import add_threads_option, presets

HELP = "list the methods and their settings"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help=f"preset whose defaults to show: {', '.join(presets())} "
                        "(default tiny)")
    parser.add_argument("--memory", action="store_true", help="parameter and optimizer-state memory of every method")
    parser.add_argument("--methods", default="all", help="comma-separated methods for --memory (default all)")
    parser.add_argument("--measured", action="store_true",
                        help="--memory from real tensors on the CPU (slow and memory-hungry at 350m+, with progress) "
                        "instead of shapes on the meta device (seconds at any preset, same counts)")
    training = parser.add_argument_group("--memory's training estimate (per GPU, bf16-pure)")
    training.add_argument("--micro-batch", type=int, default=None,
                          help="sequences per forward pass (default: a run's default, train.batch_size)")
    training.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: data.seq_len's)")
    training.add_argument("--gpus", type=int, default=8, help="GPUs FSDP shards over (default 8)")
    training.add_argument("--state-dtype", default=None, help="optim.state_dtype: fp32 or param (default fp32)")
    add_threads_option(parser)


def run(args: argparse.Namespace) -> int:
    from rankscope import methods
    from rankscope.models import get_preset

    if args.memory:
        from rankscope.config import DataConfig, OptimConfig, TrainConfig
        from rankscope.methods.memory_table import (
            memory_table,
            print_memory_table,
            print_training_memory_table,
            training_memory_table,
        )

        names = methods.names() if args.methods == "all" else args.methods.split(",")
        mode = "measured" if args.measured else "shapes"
        rows = memory_table(args.preset, names, mode=mode,
                            progress=(lambda line: print(line, file=sys.stderr, flush=True)) if args.measured else None)
        print_memory_table(rows, args.preset, mode)
        available = [row["method"] for row in rows if "error" not in row]
        train_defaults = TrainConfig()
        print_training_memory_table(training_memory_table(
            args.preset, available,
            micro_batch=args.micro_batch or train_defaults.micro_batch_size or train_defaults.batch_size,
            seq_len=args.seq_len or DataConfig().seq_len, gpus=args.gpus,
            state_dtype=args.state_dtype or OptimConfig().state_dtype))
        return 0
    from rich.console import Console
    from rich.table import Table

    from rankscope.methods.tuned import default_kinds, optim_defaults_for

    model_cfg = get_preset(args.preset)
    table = Table(title=f"rankscope methods (settings shown for preset {args.preset})")
    table.add_column("method", style="bold", no_wrap=True)
    table.add_column("description")
    table.add_column("lr (kind of default)", no_wrap=True)
    table.add_column("emb/head/norm lr", no_wrap=True)
    table.add_column("settings (defaults)")
    for name in methods.names():
        cls = methods.get(name)
        settings = cls.default_settings(args.preset, model_cfg)
        shown = ", ".join(f"{k}={v}" for k, v in vars(settings).items()) or "-"
        opt = optim_defaults_for(cls, args.preset)
        kinds = default_kinds(cls, args.preset)
        label = f"{name} (control)" if cls.is_control else name
        table.add_row(label, cls.description, f"{opt.lr:g} ({kinds['lr']})", _role_cell(opt, kinds),
                      f"{shown}; wd={opt.weight_decay} ({opt.weight_decay_scope}), eps={opt.eps}, "
                      f"clip={opt.grad_clip or 'off'}")
    Console().print(table)
    print("Optimizer defaults: 'literature' = the method's official harness (60M+ models, 10k+ steps); "
          "'tuned here' = chosen by rankscope's tuning study for this preset (docs/tuning.md). emb/head/norm lr: "
          "the embeddings', LM head's and norm gains' lr; '= lr' means they follow the method's own lr and weight "
          "decay, as in every official harness; optim.embed_lr, head_lr, norm_lr and *_weight_decay set them.")
    return 0


def _role_cell(opt, kinds: dict[str, str]) -> str:
    """The embeddings', head's and norms' lr (and weight decay where set) in `rankscope methods`:
    '= lr' when they follow the method's own, else the values (e/h/n) and whether they were tuned here."""
    roles = ("embed", "head", "norm")
    lrs = [getattr(opt, f"{role}_lr") for role in roles]
    wds = [getattr(opt, f"{role}_weight_decay") for role in roles]
    text = "= lr" if all(v is None for v in lrs) else "/".join("lr" if v is None else f"{v:g}" for v in lrs)
    if any(v is not None for v in wds):
        text += ", wd " + "/".join("wd" if v is None else f"{v:g}" for v in wds)
    return text + (" (tuned here)" if kinds.get("embed_lr") == "tuned here" else "")
