"""`rankscope export`: a checkpoint as a Hugging Face Llama model folder."""

from __future__ import annotations

import argparse

from rankscope.cli._common import add_threads_option

HELP = "export a checkpoint as a Hugging Face Llama model folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, help="output folder")
    add_threads_option(parser)


def run(args: argparse.Namespace) -> int:
    from rankscope.data import prepare_data
    from rankscope.export import check_export_target, save_hf
    from rankscope.train import load_run_model

    check_export_target(args.out)  # before loading anything
    loaded = load_run_model(args.run_dir, args.step)
    tokenizer = prepare_data(loaded.config.data).tokenizer  # cached after training
    save_hf(loaded.model, tokenizer, args.out)
    print(f"exported {args.run_dir} step {loaded.step} to {args.out}")
    return 0
