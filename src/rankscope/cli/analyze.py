"""`rankscope analyze`: the geometry metrics of trained runs.

Every option sets a field of rankscope.analysis.settings.AnalysisSettings; its default and its
help come from that dataclass (read from the source, so --help does not import torch). --set
reaches every other field.
"""

from __future__ import annotations

import argparse

from rankscope.cli._common import (
    add_field_option,
    add_threads_option,
    constant,
    field_help,
    int_list,
)

HELP = ("landscape, interpolation, spectral, similarity, intruder-dimension, 2-D landscape and Hessian metrics")
SETTINGS = ("rankscope.analysis.settings", "AnalysisSettings")
# The definitions where the study's code and ours differ: the study's is the default (docs/metrics.md).
DEFINITIONS = ("loss_average", "singular_grid", "singular_beyond_rank", "zero_matrix_gap", "last_hidden")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    families = constant(SETTINGS[0], "FAMILIES", ())
    choices = constant(SETTINGS[0], "CHOICES", {})
    spaces = constant(SETTINGS[0], "SPACES")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders to analyse (results go to RUN_DIR/analysis/)")
    parser.add_argument("--reference", required=True, metavar="FULL_RANK_RUN_DIR",
                        help="the full-rank run of the same scale and seed (similarity and IMBH partner)")
    parser.add_argument("--baseline-references", action="append", default=[], metavar="FULL_RANK_RUN_DIR[,...]",
                        help="full-rank runs of the other seeds (comma-separated or repeated): every run is also compared "
                        "with each (pairing cross-seed), and a full-rank run's comparisons with them are the full-rank "
                        "seed baseline; a seed pair of full-rank runs is analysed once, from the lower seed's run")
    parser.add_argument("--metrics", help=f"comma-separated: {','.join(families)} "
                        "(default all; landscape2d and hessian at the last step only)")
    parser.add_argument("--checkpoint-steps", "--steps", dest="steps",
                        help="comma-separated checkpoint steps to analyse (default every checkpoint; --steps is the "
                        "old name)")
    add_field_option(parser, "--probe-size", *SETTINGS, "probe_size",
                     "probe sequences to use, the first of the runs' probe set (default the whole probe set)")
    add_field_option(parser, "--directions", *SETTINGS, "directions", "random landscape directions")
    add_field_option(parser, "--grid-points", *SETTINGS, "grid_points", "landscape grid points, odd")
    parser.add_argument("--scope", help="perturbed parameters: all, blocks or both (default all)")
    parser.add_argument("--filter-normalized", action="store_true", default=None,
                        help=field_help(*SETTINGS, "filter_normalized", "also the filter-normalized random directions"))
    add_field_option(parser, "--space", *SETTINGS, "space", "landscape parameters: the method's own (native) or merged "
                     "dense weights", choices=spaces)
    add_field_option(parser, "--singular-k-max", *SETTINGS, "singular_k_max",
                     "singular directions k = 1..K (the default Ks are trimmed to k <= K, as in a study file; explicit Ks must fit)")
    add_field_option(parser, "--direction-seed", *SETTINGS, "direction_seed", "seed of the random directions")
    parser.add_argument("--no-mask-padding", dest="mask_padding", action="store_false", default=None,
                        help="do not mask padding in similarity (as the study's code)")
    add_field_option(parser, "--batch-size", *SETTINGS, "batch_size", "probe sequences per forward pass")
    add_field_option(parser, "--device", *SETTINGS, "device", "auto, cpu, cuda, cuda:N")
    definitions = parser.add_argument_group("definitions", "the study's definition is the default; ours is the other "
                                            "choice (docs/metrics.md)")
    texts = {
        "loss_average": "probe loss: mean of per-batch means (study) or token-weighted mean",
        "singular_grid": "singular-direction grid: numpy.arange(-0.05, 0.0501, 0.004) (study) or --grid-points over "
                         "+-0.05 around 0",
        "singular_beyond_rank": "k beyond a matrix's components: reuse the last (study) or perturb nothing",
        "zero_matrix_gap": "spectral gap and sigma2/sigma1 of an all-zero matrix: 0 (study) or nan",
        "last_hidden": "last layer's activations: after the final RMSNorm (study, HF hidden_states) or raw",
    }
    for name in DEFINITIONS:
        add_field_option(definitions, "--" + name.replace("_", "-"), *SETTINGS, name, texts[name],
                         choices=choices.get(name))
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="any other analysis setting, e.g. hessian_samples=20, landscape2d_points=21, "
                        "hessian_every_checkpoint=true (repeatable; `rankscope config keys --analysis` lists them)")
    add_threads_option(parser)


# Options whose value goes to the AnalysisSettings field of the same name when given.
FIELD_OPTIONS = ("probe_size", "directions", "grid_points", "filter_normalized", "space", "direction_seed",
                 "mask_padding", "batch_size", "device", *DEFINITIONS)


def run(args: argparse.Namespace) -> int:
    from rankscope.analysis.pipeline import analyze_runs
    from rankscope.analysis.settings import AnalysisSettings, trim_default_ks
    from rankscope.config import dataclass_from_dict, parse_override

    fields = {name: getattr(args, name) for name in FIELD_OPTIONS if getattr(args, name) is not None}
    if args.metrics:
        fields["metrics"] = tuple(args.metrics.split(","))
    if args.steps:
        fields["steps"] = int_list(args.steps, "--checkpoint-steps")
    if args.scope:
        fields["scopes"] = ("all", "blocks") if args.scope == "both" else tuple(args.scope.split(","))
    if args.singular_k_max is not None:
        fields["singular_k_max"] = args.singular_k_max
    fields.update(parse_override(text) for text in args.set)
    settings = dataclass_from_dict(AnalysisSettings, trim_default_ks(fields), "analysis")
    settings.__post_init__()
    settings.validate()
    baselines = [part.strip() for text in args.baseline_references for part in text.split(",") if part.strip()]
    outputs = analyze_runs(args.run_dirs, args.reference, settings, baseline_references=baselines)
    for run_dir, path in outputs.items():
        print(f"{run_dir}: {path}")
    return 0
