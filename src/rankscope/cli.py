"""The one command line: train | export | methods | analyze | eval | study | report | bench | demo | scaling.

This module only parses arguments and hands them to the package; user errors (RankscopeError)
become one `error: ...` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from rankscope.errors import RankscopeError
from rankscope.paths import check_output_folder

log = logging.getLogger("rankscope")


# ---------------------------------------------------------------------------------------------
# train


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with the run config (sections model, data, method, optim, train)")
    parser.add_argument("--preset", help="model preset: tiny, 20m, 60m, 130m, 350m, 1b, 7b")
    parser.add_argument("--method", help="training method (see `rankscope methods`)")
    parser.add_argument("--steps", type=int, help="optimizer steps")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", help="run directory (default runs/<method>-<preset>-s<seed>)")
    parser.add_argument("--data", help="data source: embedded, a .txt/.jsonl/.json.gz file or folder, hf:NAME")
    parser.add_argument("--batch-size", type=int, help="global batch in sequences")
    parser.add_argument("--micro-batch-size", type=int, help="sequences per forward pass and process")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--checkpoint-steps", help="comma-separated steps, e.g. 100,200,300")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--precision", help="fp32, bf16-autocast, bf16-pure")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set method.rank=64 (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again from step 0 when --out holds a run of a different config (removes only "
                        "that run's own files; other folders are never cleared)")


def config_from_args(args: argparse.Namespace):
    from rankscope.config import build_config, load_yaml

    base = load_yaml(args.config) if args.config else {}
    fields = {
        "model.preset": args.preset, "method.name": args.method, "train.steps": args.steps,
        "train.seed": args.seed, "data.source": args.data, "train.batch_size": args.batch_size,
        "train.micro_batch_size": args.micro_batch_size, "data.seq_len": args.seq_len,
        "optim.lr": args.lr, "train.eval_every": args.eval_every,
        "train.checkpoint_every": args.checkpoint_every, "train.device": args.device,
        "train.precision": args.precision,
        "train.checkpoint_steps": args.checkpoint_steps,
    }
    if args.method and isinstance(base.get("method"), dict) and base["method"].get("name") not in (None, args.method):
        # Settings in the file belong to the file's method; --method starts from the new one's defaults.
        base = dict(base)
        base["method"] = {}
    return build_config(base, args.overrides, **fields)


def cmd_train(args: argparse.Namespace) -> int:
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


# ---------------------------------------------------------------------------------------------
# export


def cmd_export(args: argparse.Namespace) -> int:
    from rankscope.data import prepare_data
    from rankscope.export import check_export_target, save_hf
    from rankscope.train import load_run_model

    check_export_target(args.out)  # before loading anything
    loaded = load_run_model(args.run_dir, args.step)
    tokenizer = prepare_data(loaded.config.data).tokenizer  # cached after training
    save_hf(loaded.model, tokenizer, args.out)
    print(f"exported {args.run_dir} step {loaded.step} to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# methods


def cmd_methods(args: argparse.Namespace) -> int:
    from rankscope import methods
    from rankscope.models import get_preset

    if args.memory:
        from rankscope.methods.memory_table import memory_table, print_memory_table

        names = methods.names() if args.methods == "all" else args.methods.split(",")
        mode = "measured" if args.measured else "shapes"
        rows = memory_table(args.preset, names, mode=mode,
                            progress=(lambda line: print(line, file=sys.stderr, flush=True)) if args.measured else None)
        print_memory_table(rows, args.preset, mode)
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


# ---------------------------------------------------------------------------------------------
# study, demo, eval


def _print_results(out_dir) -> None:
    from rankscope.report.tables import print_results_table

    print_results_table(out_dir)


def _launch_options(args: argparse.Namespace):
    from rankscope.study import LaunchOptions

    extra = {}
    for item in getattr(args, "slurm_extra", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RankscopeError(f"--slurm-extra takes KEY=VALUE (an sbatch option without its dashes), got {item!r}")
        extra[key.strip().lstrip("-")] = value.strip()
    return LaunchOptions(
        launcher=getattr(args, "launcher", "local"), workers=args.workers, threads=args.threads,
        time=getattr(args, "slurm_time", None), gpus_per_run=getattr(args, "slurm_gpus_per_run", None),
        partition=getattr(args, "slurm_partition", None), account=getattr(args, "slurm_account", None),
        extra=extra, dry_run=getattr(args, "dry_run", False),
    )


def cmd_study(args: argparse.Namespace) -> int:
    from rankscope.study import STAGES, run_study

    stages = tuple(args.stage.split(",")) if args.stage else STAGES
    out = args.out or f"studies-out/{Path(args.study_file).stem}"
    check_output_folder(out, "--out")
    result = run_study(args.study_file, out, stages, launch=_launch_options(args))
    if result.get("plan"):
        print(result["plan"])
        return 0
    if "report" in stages:
        _print_results(out)
    _print_study_end(result)
    return 1 if result["failed"] and len(result["failed"]) == len(result["runs"]) else 0


def _print_study_end(result: dict) -> None:
    if result["failed"]:
        print(f"{len(result['failed'])} of {len(result['runs'])} runs failed: {', '.join(result['failed'])} "
              f"(reasons in {Path(result['out']) / 'status.json'} and the report)")
    if result.get("report"):
        print(f"report: {Path(result['report']).resolve()}")


def cmd_demo(args: argparse.Namespace) -> int:
    from rankscope.demo import run_demo

    check_output_folder(args.out, "--out")
    result = run_demo(args.out, quick=args.quick, device=args.device, launch=_launch_options(args))
    _print_results(args.out)
    print(f"demo finished in {result['wall_time'] / 60:.1f} min")
    _print_study_end(result)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from rankscope.report import build_report

    out = build_report(args.study_dir)
    print(f"report: {out / 'report.html'} (also report.md, figures/, tables/)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rankscope.analysis.downstream import _expand_task_names
    from rankscope.config import check_device_name
    from rankscope.study import evaluate_run

    # Everything checked before the model is loaded.
    if args.limit < 0:
        raise RankscopeError(f"--limit takes the number of items per task (0 = all), got {args.limit}")
    if args.batch_size < 1:
        raise RankscopeError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_device_name(args.device, "--device")
    tasks = args.tasks.split(",") if args.tasks else None
    _expand_task_names(tasks)
    result = evaluate_run(Path(args.run_dir), args.step, tasks, args.limit, args.batch_size, args.device)
    for name, row in result["tasks"].items():
        norm = f", acc_norm {row['acc_norm']:.4f}" if "acc_norm" in row else ""
        print(f"{name}: acc {row.get('acc', float('nan')):.4f} ± {row.get('acc_stderr', float('nan')):.4f}{norm}")
    for name, reason in result["unavailable"].items():
        print(f"{name}: unavailable: {reason}")
    print(f"mean acc {result['mean_acc']:.4f} (step {result['step']}, written to {args.run_dir}/eval/)")
    return 0


# ---------------------------------------------------------------------------------------------
# scaling


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


def cmd_scaling(args: argparse.Namespace) -> int:
    from rankscope.scaling.fit import FitSettings

    target = list(args.target)
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
    if target[0] == "fit":
        from rankscope.scaling.analyze import analyze_table
        from rankscope.scaling.fit import read_table

        if len(target) != 2:
            raise RankscopeError("usage: rankscope scaling fit TABLE.csv (one CSV with columns method, params, tokens, loss)")
        settings = FitSettings(**overrides)
        settings.validate()
        table = read_table(target[1])
        out = args.out or str(Path(target[1]).with_suffix("")) + "-fit"
        check_output_folder(out, "--out")
        result = analyze_table(table, out, settings, title=Path(target[1]).stem)
        _print_fits(result)
        return 0
    if len(target) != 1:
        raise RankscopeError("usage: rankscope scaling SPEC.yaml, or rankscope scaling fit TABLE.csv")
    from rankscope.scaling.runner import load_spec, run_scaling

    spec = load_spec(target[0])
    for key, value in overrides.items():
        setattr(spec.fit, key, value)
    spec.fit.validate()
    out = args.out or f"scaling-out/{Path(target[0]).stem}"
    check_output_folder(out, "--out")
    result = run_scaling(None, out, spec=spec, launch=_launch_options(args))
    if result.get("plan"):
        print(result["plan"])
        return 0
    _print_fits(result)
    if result["failed"]:
        print(f"{len(result['failed'])} runs failed and were left out of the fit: {', '.join(result['failed'])}")
    return 0


# ---------------------------------------------------------------------------------------------
# analyze


def _int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise RankscopeError(f"{option} takes comma-separated integers like 100,200, got {text!r}") from None


def cmd_analyze(args: argparse.Namespace) -> int:
    from rankscope.analysis.pipeline import analyze_runs
    from rankscope.analysis.settings import FAMILIES, AnalysisSettings
    from rankscope.config import dataclass_from_dict, parse_override

    scopes = ("all", "blocks") if args.scope == "both" else tuple(args.scope.split(","))
    fields = dict(
        metrics=tuple(args.metrics.split(",")) if args.metrics else FAMILIES,
        steps=_int_list(args.steps, "--steps"),
        probe_size=args.probe_size,
        batch_size=args.batch_size,
        device=args.device,
        directions=args.directions,
        grid_points=args.grid_points,
        scopes=scopes,
        filter_normalized=args.filter_normalized,
        space=args.space,
        direction_seed=args.direction_seed,
        mask_padding=not args.no_mask_padding,
    )
    # Definitions where the study's code and ours differ: the study's is the default (docs/metrics.md).
    for name in ("loss_average", "singular_grid", "singular_beyond_rank", "zero_matrix_gap", "last_hidden"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    fields.update(parse_override(text) for text in args.set)
    settings = dataclass_from_dict(AnalysisSettings, fields, "analysis")
    settings.__post_init__()
    if args.singular_k_max is not None:
        settings.singular_k_max = args.singular_k_max
        settings.singular_ks = tuple(k for k in settings.singular_ks if k <= args.singular_k_max) or (args.singular_k_max,)
    baselines = [part.strip() for text in args.baseline_references for part in text.split(",") if part.strip()]
    outputs = analyze_runs(args.run_dirs, args.reference, settings, baseline_references=baselines)
    for run, path in outputs.items():
        print(f"{run}: {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# bench


def _model_overrides(items: list[str]) -> dict:
    from rankscope.config import parse_override

    return dict(parse_override(item) for item in items)


def _names(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated option as a tuple (empty string: an empty tuple; absent: None)."""
    return None if text is None else tuple(part.strip() for part in text.split(",") if part.strip())


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from rankscope.bench import BENCHMARKS, run_benchmark

    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise RankscopeError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    options = {
        "preset": args.preset, "methods": args.methods, "device": args.device, "repeats": args.repeats,
        "budget_s": args.budget_s, "infer_preset": args.infer_preset,
        "compile_methods": _names(args.compile_methods), "precisions": _names(args.precisions),
        "steps": args.steps, "warmup_steps": args.warmup_steps, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "period": args.period, "precision": args.precision, "compile": args.compile or None,
        "peak_tflops": args.peak_tflops, "memory": False if args.no_memory else None,
        "dynamics": False if args.no_dynamics else None,
        "batch_sizes": _int_list(args.batch_sizes, "--batch-sizes"), "seq_lens": _int_list(args.seq_lens, "--seq-lens"),
        "iters": args.iters, "rank": args.rank, "loro_sizes": _int_list(args.loro_sizes, "--loro-sizes"),
        "loro_rank": args.loro_rank, "svd_oversample": args.svd_oversample, "svd_niter": args.svd_niter,
        "probe_sequences": args.probe_sequences, "seed": args.seed,
        "model_overrides": _model_overrides(args.model) or None,
    }
    check_output_folder(args.out, "--out")
    if args.benchmark == "gpu":
        return _gpu_check(options, args.out)
    names = BENCHMARKS if args.benchmark == "all" else (args.benchmark,)
    for name in names:
        result = run_benchmark(name, options, out_dir=args.out)
        for kind, path in result.files.items():
            print(f"{name} {kind}: {path}")
    return 0


def _gpu_check(options: dict, out: str) -> int:
    """Exit 0 when every path passed (or there is no CUDA device to check), 1 when any failed."""
    import torch

    from rankscope.bench import make_config
    from rankscope.bench.gpu import run_gpu_check

    config = make_config("gpu", options)
    config.validate()
    if not config.device.startswith("cuda"):
        raise RankscopeError(f"bench gpu checks CUDA devices; use --device cuda or cuda:N, not {config.device!r}")
    if not torch.cuda.is_available():
        print(f"bench gpu: no CUDA device here (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
              "the arguments are valid, nothing else to check")
        return 0
    payload = run_gpu_check(config, out_dir=out)
    return 0 if payload["ok"] else 1


def _add_launch_arguments(parser: argparse.ArgumentParser, cluster: bool = False) -> None:
    from rankscope.study import LAUNCHERS

    parser.add_argument("--launcher", default="local", choices=LAUNCHERS,
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
    parser.add_argument("--slurm-account", help="slurm: account to charge")
    parser.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                        help="slurm: any other sbatch option, e.g. --slurm-extra qos=high --slurm-extra cpus-per-task=8 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print how the jobs would be launched (the sbatch "
                        "parameters for slurm) and stop; nothing is written or submitted")


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankscope",
        description="Low-rank pre-training of language models: train every method in one pipeline, "
        "analyse what they learn beyond perplexity, report and benchmark.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; each job of "
                        "`study` and `demo` uses 1, which gives the same numbers whatever --workers is)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train (or resume) one run")
    _add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export a checkpoint as a Hugging Face Llama model folder")
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("methods", help="list the methods and their settings")
    p.add_argument("--preset", default="tiny", help="preset whose defaults to show (default tiny)")
    p.add_argument("--memory", action="store_true", help="parameter and optimizer-state memory of every method")
    p.add_argument("--methods", default="all", help="comma-separated methods for --memory (default all)")
    p.add_argument("--measured", action="store_true",
                   help="--memory from real tensors on the CPU (slow and memory-hungry at 350m+, with progress) "
                   "instead of shapes on the meta device (seconds at any preset, same counts)")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("study", help="run a study: tune, train, analyze, eval, predict, report")
    p.add_argument("study_file", help="study YAML (see studies/)")
    p.add_argument("--out", help="study folder (default studies-out/<file name>)")
    p.add_argument("--stage", help="comma-separated stages to run: tune, train, analyze, eval, predict, report "
                   "(default all; tune does nothing without a tune: block)")
    _add_launch_arguments(p, cluster=True)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("demo", help="the demo study: every method on the tiny preset, analysed and reported")
    p.add_argument("--quick", action="store_true", help="a ~2-minute variant (fewer methods and steps)")
    p.add_argument("--out", default="rankscope-demo", help="where the study and its report go (default ./rankscope-demo)")
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--workers", type=int, help="runs at a time (default: one per CPU core, or one per GPU)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="tables and figures of a study folder: report.md, report.html, figures/, tables/")
    p.add_argument("study_dir", help="the --out folder of `rankscope study`")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("eval", help="zero-shot downstream accuracy of a checkpoint (lm-eval-harness)")
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--tasks", help="comma-separated tasks (default: the study's suite; rankscope_local works offline)")
    p.add_argument("--limit", type=int, default=0, help="items per task (default all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("scaling", help="scaling laws: `scaling SPEC.yaml` trains a size x token grid per method and fits "
                       "it; `scaling fit TABLE.csv` fits L(N, D) = E + A/N^alpha + B/D^beta to a table")
    p.add_argument("target", nargs="+", metavar="SPEC.yaml | fit TABLE.csv",
                   help="a scaling spec (see studies/scaling-small.yaml), or `fit` and a CSV with columns "
                        "method, params, tokens, loss")
    p.add_argument("--out", help="output folder (default scaling-out/<spec name>, or <TABLE>-fit next to the CSV)")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples for the confidence intervals (default 1000)")
    p.add_argument("--seed", type=int, help="seed of the bootstrap (default 0)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="initial values of a, b, e, alpha or beta for the L-BFGS starts, replacing Hoffmann et al.'s "
                        "(e.g. --grid alpha=0,1,2; repeatable); fewer starts fit faster")
    _add_launch_arguments(p, cluster=True)
    p.set_defaults(func=cmd_scaling)

    p = sub.add_parser("analyze", help="landscape, interpolation, spectral, similarity, intruder-dimension, 2-D landscape and Hessian metrics")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders to analyse (results go to RUN_DIR/analysis/)")
    p.add_argument("--reference", required=True, metavar="FULL_RANK_RUN_DIR",
                   help="the full-rank run of the same scale and seed (similarity and IMBH partner)")
    p.add_argument("--baseline-references", action="append", default=[], metavar="FULL_RANK_RUN_DIR[,...]",
                   help="full-rank runs of the other seeds (comma-separated or repeated): every run is also compared "
                        "with each (pairing cross-seed), and a full-rank run's comparisons with them are the full-rank "
                        "seed baseline; a seed pair of full-rank runs is analysed once, from the lower seed's run")
    p.add_argument("--metrics", help="comma-separated: landscape,interpolation,spectral,similarity,intruder,landscape2d,hessian "
                                     "(default all; landscape2d and hessian at the last step only)")
    p.add_argument("--steps", help="comma-separated checkpoint steps (default every checkpoint)")
    p.add_argument("--probe-size", type=int, help="probe sequences to use (default the whole probe set)")
    p.add_argument("--directions", type=int, default=100, help="random landscape directions (default 100)")
    p.add_argument("--grid-points", type=int, default=25, help="landscape grid points, odd (default 25)")
    p.add_argument("--scope", default="all", help="perturbed parameters: all, blocks or both (default all)")
    p.add_argument("--filter-normalized", action="store_true", help="also the filter-normalized random directions")
    p.add_argument("--space", default="native", choices=["native", "dense"],
                   help="landscape parameters: the method's own (default) or merged dense weights")
    p.add_argument("--singular-k-max", type=int, help="singular directions k = 1..K (default 20)")
    p.add_argument("--direction-seed", type=int, default=0, help="seed of the random directions (default 0)")
    p.add_argument("--no-mask-padding", action="store_true", help="do not mask padding in similarity (as the study's code)")
    p.add_argument("--batch-size", type=int, default=32, help="probe sequences per forward pass (default 32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    definitions = p.add_argument_group("definitions", "the study's definition is the default; ours is the other choice "
                                                      "(docs/metrics.md)")
    definitions.add_argument("--loss-average", choices=["batch_mean", "token"],
                             help="probe loss: mean of per-batch means (study) or token-weighted mean")
    definitions.add_argument("--singular-grid", choices=["study", "centered"],
                             help="singular-direction grid: numpy.arange(-0.05, 0.0501, 0.004) (study) or --grid-points "
                                  "over +-0.05 around 0")
    definitions.add_argument("--singular-beyond-rank", choices=["clamp", "zero"],
                             help="k beyond a matrix's components: reuse the last (study) or perturb nothing")
    definitions.add_argument("--zero-matrix-gap", choices=["zero", "nan"],
                             help="spectral gap and sigma2/sigma1 of an all-zero matrix: 0 (study) or nan")
    definitions.add_argument("--last-hidden", choices=["final_norm", "block_output"],
                             help="last layer's activations: after the final RMSNorm (study, HF hidden_states) or raw")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any other analysis setting, e.g. hessian_samples=20, landscape2d_points=21, "
                        "hessian_every_checkpoint=true (repeatable)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("bench", help="cost of every method vs full-rank: train | infer | optimizer | analysis | all; "
                       "gpu: the check of every GPU-only path (scripts/gpu_check.sh)")
    p.add_argument("benchmark", choices=["train", "infer", "optimizer", "analysis", "all", "gpu"])
    p.add_argument("--preset", help="model preset (default tiny; gpu: 60m)")
    p.add_argument("--methods", help="comma-separated methods or all (default all; full is always included)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default cpu; gpu: cuda); cuda runs bf16")
    p.add_argument("--out", default="bench-results", help="folder for <benchmark>.json/.csv/.png (default bench-results)")
    p.add_argument("--repeats", type=int, help="alternating rounds over the methods (default 3)")
    # SUPPRESS: without the option here, `rankscope --threads 1 bench ...` keeps the global value
    # (a sub-parser's default would overwrite it).
    p.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                   help="torch CPU threads (default torch's); 1 is steadier on a busy machine")
    p.add_argument("--seed", type=int)
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, e.g. --model num_layers=2 (repeatable)")
    p.add_argument("--steps", type=int, help="train: timed steps per method and round; optimizer: steps per sample")
    p.add_argument("--warmup-steps", type=int, help="train: untimed steps first (default 3)")
    p.add_argument("--batch-size", type=int, help="train: sequences per step; analysis: per forward")
    p.add_argument("--seq-len", type=int, help="train / analysis: tokens per sequence (default 128)")
    p.add_argument("--period", type=int, help="train: period of GaLore refresh / LORO exact step / ReLoRA merge while timing (default 4)")
    p.add_argument("--precision", help="train: fp32, bf16-autocast, bf16-pure; infer: fp32, bf16 (default fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--compile", action="store_true", help="train / infer: torch.compile the model")
    p.add_argument("--peak-tflops", type=float, help="train: device peak for MFU (default: looked up for known GPUs)")
    p.add_argument("--no-memory", action="store_true", help="train: skip the peak-memory pass")
    p.add_argument("--no-dynamics", action="store_true",
                   help="train: skip timing the training-dynamics measurement (train.dynamics_every)")
    p.add_argument("--batch-sizes", help="infer: comma-separated batch sizes (default 1,8 on CPU; 64,128 on CUDA)")
    p.add_argument("--seq-lens", help="infer: comma-separated sequence lengths (default 64,256 on CPU; 128..1024 on CUDA)")
    p.add_argument("--iters", type=int, help="infer: forwards per timing sample (default 5)")
    p.add_argument("--rank", type=int, help="optimizer: projection rank (default the methods' rank for the preset)")
    p.add_argument("--loro-sizes", help="optimizer: comma-separated d for the LORO scaling (default 64..1024 on CPU)")
    p.add_argument("--loro-rank", type=int, help="optimizer: rank r of the LORO scaling (default 32)")
    p.add_argument("--svd-oversample", type=int, help="optimizer: extra columns of the randomized refresh (default 8)")
    p.add_argument("--svd-niter", type=int, help="optimizer: subspace iterations of the randomized refresh (default 2)")
    p.add_argument("--probe-sequences", type=int, help="analysis: probe-set size in sequences (default 16)")
    p.add_argument("--budget-s", type=float, help="gpu: time budget in seconds; paths that would start later count "
                   "as failed (default 285)")
    p.add_argument("--compile-methods", help="gpu: methods also trained with torch.compile (default full,loro; '' for none)")
    p.add_argument("--precisions", help="gpu: comma-separated training precisions (default bf16-pure,bf16-autocast)")
    p.add_argument("--infer-preset", help="gpu: preset of the dense vs factorized inference (default 1b)")
    p.set_defaults(func=cmd_bench)

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
    # study, demo and scaling run their jobs in worker processes, which take --threads themselves.
    threads = args.threads if args.command not in ("study", "demo", "scaling") else None
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
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


if __name__ == "__main__":
    raise SystemExit(main())
