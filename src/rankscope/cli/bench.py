"""`rankscope bench train | infer | optimizer | analysis | all | gpu`: what every method costs.

Each benchmark is a sub-command with only the options its config dataclass has (a
*BenchConfig in rankscope.bench.<name>), so an option that does not apply is an argparse error.
Defaults and most help come from those dataclasses, read from the source (no torch for --help).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

from rankscope.cli._common import (
    add_threads_option,
    field_help,
    int_list,
    names,
    presets,
)
from rankscope.errors import RankscopeError
from rankscope.paths import check_output_folder

HELP = ("cost of every method vs full-rank: train | infer | optimizer | analysis | all; "
        "gpu: the check of every GPU-only path (scripts/gpu_check.sh)")

CONFIGS = {
    "train": ("rankscope.bench.train", "TrainBenchConfig"),
    "infer": ("rankscope.bench.infer", "InferBenchConfig"),
    "optimizer": ("rankscope.bench.optimizer.config", "OptimizerBenchConfig"),
    "analysis": ("rankscope.bench.analysis", "AnalysisBenchConfig"),
    "gpu": ("rankscope.bench.gpu.config", "GpuCheckConfig"),
}
SUMMARIES = {
    "train": "seconds per step, tokens/s, periodic work, peak memory, optimizer state and MFU of every method",
    "infer": "forward latency of every method's final model over a batch x sequence-length grid",
    "optimizer": "our GaLore / Fira AdamW against the reference packages; LORO's exact step against a dense SVD",
    "analysis": "cost of a landscape / interpolation point and spectral rows per second, per method",
    "all": "train, infer, optimizer and analysis one after the other, with the options they share",
    "gpu": "one check of every GPU-only path, pass/fail per path (what scripts/gpu_check.sh runs)",
}
# The benchmarks `all` runs (rankscope.bench.BENCHMARKS) and the options they all take.
ALL = ("train", "infer", "optimizer", "analysis")


@dataclasses.dataclass(frozen=True)
class Flag:
    flag: str
    field: str
    kind: str  # int, float, str, names (comma-separated), ints, true / false (a switch setting the field), model
    texts: dict  # benchmark -> help (None: the config field's comment); only these benchmarks take the flag
    metavar: str | None = None


FLAGS = (
    Flag("--preset", "preset", "str", {b: None for b in (*CONFIGS, "all")}),
    Flag("--methods", "methods", "str", {"train": None, "infer": None, "analysis": None,
                                         "gpu": "comma-separated methods to train, or all",
                                         "all": "comma-separated methods or all (full is always included; the "
                                                "optimizer benchmark has its own fixed set)"}),
    Flag("--device", "device", "str", {**{b: None for b in (*CONFIGS, "all")},
                                       "gpu": "cuda or cuda:N; cpu runs the same paths at tiny shapes"}),
    Flag("--repeats", "repeats", "int", {"train": None, "infer": None, "optimizer": None, "analysis": None,
                                         "all": None}),
    Flag("--seed", "seed", "int", {b: None for b in (*CONFIGS, "all")}),
    Flag("--model", "model_overrides", "model", {b: None for b in (*CONFIGS, "all")}, "KEY=VALUE"),
    Flag("--steps", "steps", "int", {"train": "timed steps per method and round", "optimizer": None, "gpu": None}),
    Flag("--warmup-steps", "warmup_steps", "int", {"train": "untimed steps first", "gpu": None}),
    Flag("--batch-size", "batch_size", "int", {"train": "sequences per step", "analysis": "sequences per forward pass",
                                               "gpu": "sequences per training step"}),
    Flag("--seq-len", "seq_len", "int", {"train": "tokens per sequence", "analysis": "tokens per sequence",
                                         "gpu": "tokens per sequence"}),
    Flag("--period", "period", "int", {"train": "period of GaLore refresh / LORO exact step / ReLoRA merge while timing",
                                       "gpu": None}),
    Flag("--precision", "precision", "str", {"train": "fp32, bf16-autocast, bf16-pure (default fp32 on CPU, "
                                                      "bf16-autocast on CUDA)",
                                             "infer": "fp32, bf16 (default fp32 on CPU, bf16 on CUDA)"}),
    Flag("--compile", "compile", "true", {"train": "torch.compile the model", "infer": "torch.compile the model"}),
    Flag("--peak-tflops", "peak_tflops", "float", {"train": "device peak for MFU (default: looked up for known GPUs)",
                                                   "gpu": "device peak for MFU (default: looked up for known GPUs)"}),
    Flag("--no-memory", "memory", "false", {"train": "skip the peak-memory pass"}),
    Flag("--no-dynamics", "dynamics", "false",
         {"train": "skip timing the training-dynamics measurement (train.dynamics_every)"}),
    Flag("--batch-sizes", "batch_sizes", "ints", {"infer": "comma-separated batch sizes (default 1,8 on CPU; 64,128 on CUDA)"}),
    Flag("--seq-lens", "seq_lens", "ints", {"infer": "comma-separated sequence lengths (default 64,256 on CPU; "
                                                     "128..1024 on CUDA)"}),
    Flag("--iters", "iters", "int", {"infer": None}),
    Flag("--rank", "rank", "int", {"optimizer": "projection rank (default the methods' rank for the preset)"}),
    Flag("--loro-sizes", "loro_sizes", "ints", {"optimizer": "comma-separated d for the LORO scaling "
                                                             "(default 64..1024 on CPU)"}),
    Flag("--loro-rank", "loro_rank", "int", {"optimizer": "rank r of the LORO scaling"}),
    Flag("--svd-oversample", "svd_oversample", "int", {"optimizer": "extra columns of the randomized refresh"}),
    Flag("--svd-niter", "svd_niter", "int", {"optimizer": "subspace iterations of the randomized refresh"}),
    Flag("--probe-sequences", "probe_sequences", "int", {"analysis": "probe-set size in sequences",
                                                         "gpu": "probe-set size in sequences"}),
    Flag("--budget-s", "budget_s", "float", {"gpu": "time budget in seconds; a path still running then is killed, "
                                                    "and the paths after it count as out of time"}),
    Flag("--limit", "limits_s", "model", {"gpu": "watchdog limit of one kind of path, e.g. --limit compile=90 "
                                                 "(repeatable; kinds: see rankscope.bench.gpu.PATH_LIMITS_S)"},
         "KIND=SECONDS"),
    Flag("--ddp-processes", "ddp_processes", "int", {"gpu": "processes of the DDP path (default: every visible "
                                                            "GPU; skipped below two)"}),
    Flag("--compile-methods", "compile_methods", "names",
         {"gpu": "methods compiled and compared with eager, first ('' for none)"}),
    Flag("--precisions", "precisions", "names", {"gpu": "comma-separated training precisions"}),
    Flag("--infer-preset", "infer_preset", "str", {"gpu": "preset of the dense vs factorized inference"}),
)
GENERIC = {
    "methods": "comma-separated methods or all (full is always included)",
    "device": "cpu, cuda, cuda:N or auto; cuda runs bf16",
    "repeats": "alternating rounds over the methods",
    "seed": "seed of the models and data",
    "model_overrides": "model config override, e.g. --model num_layers=2 (repeatable)",
}


def _text(flag: Flag, bench: str) -> str:
    module, cls = CONFIGS["train" if bench == "all" else bench]
    text = flag.texts[bench]
    if text is None and flag.field == "preset":
        text = "model preset: " + ", ".join(presets())
    if text is None and flag.field in GENERIC:
        text = GENERIC[flag.field]
    if flag.kind in ("true", "false", "model"):
        return text.replace("%", "%%")
    return field_help(module, cls, flag.field, text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="{" + ",".join(SUMMARIES) + "}", required=True)
    for bench, summary in SUMMARIES.items():
        p = sub.add_parser(bench, help=summary, description=summary)
        p.defer(functools.partial(add_bench_arguments, bench=bench))  # built when this benchmark is chosen
        p.set_defaults(bench_flags=tuple(f for f in FLAGS if bench in f.texts))


def add_bench_arguments(p: argparse.ArgumentParser, bench: str) -> None:
    """The options of one benchmark: the FLAGS that name it, --out and --threads."""
    for flag in FLAGS:
        if bench not in flag.texts:
            continue
        help_text = _text(flag, bench)
        if flag.kind == "true":
            p.add_argument(flag.flag, dest=flag.field, action="store_const", const=True, default=None, help=help_text)
        elif flag.kind == "false":
            p.add_argument(flag.flag, dest=flag.field, action="store_const", const=False, default=None, help=help_text)
        elif flag.kind == "model":
            p.add_argument(flag.flag, dest=flag.field, action="append", default=[], metavar=flag.metavar,
                           help=help_text)
        else:
            kind = {"int": int, "float": float}.get(flag.kind)
            p.add_argument(flag.flag, dest=flag.field, type=kind, default=None, help=help_text)
    p.add_argument("--out", default="bench-results", help="folder for <benchmark>.json/.csv/.png (default bench-results)")
    add_threads_option(p)


def _options(args: argparse.Namespace) -> dict:
    """The chosen benchmark's options: only the flags it declares, None where not given."""
    from rankscope.config import parse_override

    options = {}
    for flag in args.bench_flags:
        value = getattr(args, flag.field)
        if flag.kind == "ints":
            value = int_list(value, flag.flag)
        elif flag.kind == "names":
            value = names(value)
        elif flag.kind == "model":
            value = dict(parse_override(item) for item in value) or None
        options[flag.field] = value
    return options


def run(args: argparse.Namespace) -> int:
    import torch

    from rankscope.bench import BENCHMARKS, make_config, run_benchmark

    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise RankscopeError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    options = _options(args)
    check_output_folder(args.out, "--out")
    if args.benchmark == "gpu":
        return _gpu_check(options, args.out)
    for name in BENCHMARKS if args.benchmark == "all" else (args.benchmark,):
        if args.benchmark == "all":
            fields = {f.name for f in dataclasses.fields(type(make_config(name, {})))}
            chosen = {k: v for k, v in options.items() if k in fields}
        else:
            chosen = options
        result = run_benchmark(name, chosen, out_dir=args.out)
        for kind, path in result.files.items():
            print(f"{name} {kind}: {path}")
    return 0


def _gpu_check(options: dict, out: str) -> int:
    """Exit 0 when every path passed (or there is no CUDA device to check), 1 when any failed.
    `--device cpu` runs the same paths at tiny shapes (what the tests run)."""
    import torch

    from rankscope.bench.gpu import config_for, run_gpu_check

    config = config_for(options)
    config.validate()
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench gpu: no CUDA device here (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
              "the arguments are valid, nothing else to check")
        return 0
    payload = run_gpu_check(config, out_dir=out)
    return 0 if payload["ok"] else 1
