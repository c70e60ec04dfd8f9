"""`rankscope eval`: zero-shot downstream accuracy of one checkpoint (lm-eval-harness)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rankscope.cli._common import add_field_option, add_threads_option, constant
from rankscope.errors import RankscopeError

HELP = "zero-shot downstream accuracy of a checkpoint (lm-eval-harness)"
SPEC = ("rankscope.study.spec", "EvalSpec")  # a study's eval: block; its defaults are this command's


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default_tasks = constant("rankscope.analysis.downstream.tasks", "DEFAULT_TASKS", ())
    hub_tasks = constant("rankscope.analysis.downstream.tasks", "HUB_TASKS", ())
    parser.add_argument("run_dir")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--tasks", help="comma-separated lm-eval tasks or groups (default: "
                        f"{','.join(default_tasks)}, as in a study's eval: block; it runs offline). "
                        f"rankscope_hub = the study's suite ({','.join(hub_tasks)}), which needs the "
                        "Hugging Face hub or its local cache")
    add_field_option(parser, "--limit", *SPEC, "limit", "items per task, 0 = all")
    add_field_option(parser, "--batch-size", *SPEC, "batch_size", "sequences per forward pass",
                     aliases=("--batch_size",))
    add_field_option(parser, "--device", *SPEC, "device", "auto, cpu, cuda, cuda:N")
    add_threads_option(parser)


def run(args: argparse.Namespace) -> int:
    from rankscope.analysis.downstream import expand_task_names, settle_hub_mode
    from rankscope.config import check_device_name
    from rankscope.study import evaluate_run
    from rankscope.study.spec import EvalSpec
    from rankscope.train.setup import read_run_config

    defaults = EvalSpec()
    limit = defaults.limit if args.limit is None else args.limit
    batch_size = defaults.batch_size if args.batch_size is None else args.batch_size
    device = defaults.device if args.device is None else args.device
    # Everything checked before the model is loaded, the cheap checks first.
    if limit < 0:
        raise RankscopeError(f"--limit takes the number of items per task (0 = all), got {limit}")
    if batch_size < 1:
        raise RankscopeError(f"--batch-size must be at least 1, got {batch_size}")
    check_device_name(device, "--device")
    read_run_config(args.run_dir)  # not a run: say so before indexing lm-eval's tasks (seconds)
    tasks = args.tasks.split(",") if args.tasks else None
    settle_hub_mode(tasks)  # before lm-eval's task index imports the Hugging Face libraries
    expand_task_names(tasks)
    result = evaluate_run(Path(args.run_dir), args.step, tasks, limit, batch_size, device)
    for name, row in result["tasks"].items():
        norm = f", acc_norm {row['acc_norm']:.4f}" if "acc_norm" in row else ""
        print(f"{name}: acc {row.get('acc', float('nan')):.4f} ± {row.get('acc_stderr', float('nan')):.4f}{norm}")
    for name, reason in result["unavailable"].items():
        print(f"{name}: unavailable: {reason}")
    print(f"mean acc {result['mean_acc']:.4f} (step {result['step']}, written to {args.run_dir}/eval/)")
    return 0
