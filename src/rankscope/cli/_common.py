"""Pieces that several commands share: options derived from config dataclasses, the launch
options of study / demo / scaling, --threads, and how a run with failed jobs ends.

Nothing here imports torch (or anything that does) at module level.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any

from rankscope.cli._fields import (
    UNKNOWN,
    dict_keys,
    field_doc,
    module_constant,
    shown,
)
from rankscope.errors import RankscopeError

RUN_CONFIG_MODULE = "rankscope.config"
# Which dataclass of rankscope.config holds each top-level section of a run config.
RUN_CONFIG_SECTIONS = {"model": "ModelSection", "data": "DataConfig", "method": "MethodSection",
                       "optim": "OptimConfig", "train": "TrainConfig"}


def constant(module: str, name: str, fallback: Any = None) -> Any:
    """A module-level constant read from the source (`fallback` where it cannot be read)."""
    value = module_constant(module, name)
    return fallback if value is UNKNOWN else value


def presets() -> tuple[str, ...]:
    """rankscope.models.PRESETS, read without importing torch."""
    return dict_keys("rankscope.models.presets", "PRESETS")


def launchers() -> tuple[str, ...] | None:
    """rankscope.study.LAUNCHERS (None where the source cannot be read: LaunchOptions still checks)."""
    value = module_constant("rankscope.study.launch", "LAUNCHERS")
    return None if value is UNKNOWN else value


def escape_help(text: str) -> str:
    return text.replace("%", "%%")


def scalar_type(annotation: str):
    """int / float / str from an annotation such as 'int | None' (None: not a scalar)."""
    parts = {part.strip() for part in annotation.split("|")} - {"None"}
    if len(parts) != 1:
        return None
    return {"int": int, "float": float, "str": str}.get(parts.pop())


def field_help(module: str, cls: str, name: str, text: str | None = None, *, key: str | None = None,
               default: Any = UNKNOWN) -> str:
    """Help of an option that sets dataclass field `name`: `text` (else the field's comment),
    then its default as the dataclass has it, and the config key where there is one."""
    doc = field_doc(module, cls, name)
    value = doc.default if default is UNKNOWN else default
    parts = [f"default {shown(value)}"] if value not in (None, UNKNOWN) else []
    if key:
        parts.append(f"config key {key}")
    body = text or doc.comment or name.replace("_", " ")
    return escape_help(body + (f" ({'; '.join(parts)})" if parts else ""))


def add_field_option(parser, flag: str, module: str, cls: str, name: str, text: str | None = None, *,
                     aliases: tuple[str, ...] = (), key: str | None = None, dest: str | None = None, **kwargs) -> None:
    """An option for dataclass field `name`: default None (the dataclass default applies), type
    from the annotation unless given, help from `field_help`."""
    doc = field_doc(module, cls, name)
    if "type" not in kwargs and "action" not in kwargs:
        scalar = scalar_type(doc.type)
        if scalar is not None and scalar is not str:
            kwargs["type"] = scalar
    parser.add_argument(flag, *aliases, dest=dest or name, default=None,
                        help=field_help(module, cls, name, text, key=key), **kwargs)


def run_config_field(key: str):
    """The FieldDoc of a dotted run-config key such as 'train.steps'."""
    section, _, name = key.partition(".")
    return field_doc(RUN_CONFIG_MODULE, RUN_CONFIG_SECTIONS[section], name)


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: without the option here, `rankscope --threads 1 COMMAND ...` keeps the global value
    # (a sub-parser's default would overwrite it).
    parser.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                        help="torch CPU threads (default: torch's choice; each job of `study`, `demo` and `scaling` "
                        "uses 1, which gives the same numbers whatever --workers is); also accepted before the command")


def add_allow_failures(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-failures", action="store_true",
                        help="exit 0 even when some runs failed (default: exit 1 when any run failed)")


def add_launch_arguments(parser: argparse.ArgumentParser, cluster: bool = False) -> None:
    parser.add_argument("--launcher", default="local", choices=launchers(),
                        help="local: worker processes here (default); submitit-local: submitit jobs here; "
                        "slurm: one SLURM job per run, a job array per stage")
    parser.add_argument("--workers", type=int, help="jobs at a time (local default: one per CPU core with one "
                        "torch thread each, or one per GPU; slurm default: no limit)")
    if not cluster:
        return
    parser.add_argument("--slurm-partition", help="slurm: partition")
    parser.add_argument("--slurm-time", help="slurm, submitit-local: time limit of a job (minutes or H:M:S, default 4:00:00); "
                        "a run that reaches it checkpoints and is requeued")
    parser.add_argument("--slurm-gpus-per-run", type=int, help="slurm, submitit-local: GPUs per training run, one DDP "
                        "process each (default 1 on slurm); analysis and eval use one")
    parser.add_argument("--slurm-gpus-per-node", type=int, help="slurm: GPUs per node; a run with more GPUs spans "
                        "ceil(GPUs / this) nodes, one task per GPU (default: all of a run's GPUs on one node)")
    parser.add_argument("--slurm-nodes", type=int, help="slurm: nodes per training run (default: from "
                        "--slurm-gpus-per-run and --slurm-gpus-per-node; give any two of the three)")
    parser.add_argument("--slurm-cpus-per-gpu", type=int, help="slurm: CPU cores per GPU task (--cpus-per-task; "
                        "torch uses that many threads; default 8)")
    parser.add_argument("--slurm-mem-per-gpu", help="slurm: host memory per GPU task, e.g. 64G (default: from the "
                        "largest model, 16 bytes per parameter + 8 GB, at least 16G)")
    parser.add_argument("--slurm-signal-delay", type=int, metavar="SECONDS", help="slurm, submitit-local: how long "
                        "before the time limit a job is told to checkpoint and requeue (default from the largest "
                        "model: 90 below 300M parameters, 240 below 1B, 600 from 1B)")
    parser.add_argument("--slurm-account", help="slurm: account to charge")
    parser.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                        help="slurm: any other sbatch option, e.g. --slurm-extra qos=high --slurm-extra cpus-per-task=8 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print how the jobs would be launched (the sbatch "
                        "parameters for slurm) and stop; nothing is written or submitted")


def launch_options(args: argparse.Namespace):
    from rankscope.study import LaunchOptions

    extra = {}
    for item in getattr(args, "slurm_extra", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RankscopeError(f"--slurm-extra takes KEY=VALUE (an sbatch option without its dashes), got {item!r}")
        extra[key.strip().lstrip("-")] = value.strip()
    return LaunchOptions(
        launcher=getattr(args, "launcher", "local"), workers=args.workers, threads=getattr(args, "threads", None),
        time=getattr(args, "slurm_time", None), gpus_per_run=getattr(args, "slurm_gpus_per_run", None),
        gpus_per_node=getattr(args, "slurm_gpus_per_node", None), nodes=getattr(args, "slurm_nodes", None),
        cpus_per_gpu=getattr(args, "slurm_cpus_per_gpu", None), mem_per_gpu=getattr(args, "slurm_mem_per_gpu", None),
        signal_delay_s=getattr(args, "slurm_signal_delay", None),
        partition=getattr(args, "slurm_partition", None), account=getattr(args, "slurm_account", None),
        extra=extra, dry_run=getattr(args, "dry_run", False),
    )


def print_results(out_dir) -> None:
    from rankscope.report.tables import print_results_table

    print_results_table(out_dir)


def print_study_end(result: dict) -> None:
    if result["failed"]:
        print(f"{len(result['failed'])} of {len(result['runs'])} runs failed: {', '.join(result['failed'])} "
              f"(reasons in {Path(result['out']) / 'status.json'} and the report)")
    if result.get("report"):
        print(f"report: {Path(result['report']).resolve()}")


def failure_status(failed: typing.Sequence[str], args: argparse.Namespace) -> int:
    """1 when any run failed (the one-line summary is printed by the caller), unless --allow-failures."""
    if failed and not getattr(args, "allow_failures", False):
        return 1
    return 0


def int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise RankscopeError(f"{option} takes comma-separated integers like 100,200, got {text!r}") from None


def names(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated option as a tuple (empty string: an empty tuple; absent: None)."""
    return None if text is None else tuple(part.strip() for part in text.split(",") if part.strip())
