#!/usr/bin/env bash
# The GPU check: every GPU-only path of rankscope (bf16-pure and bf16-autocast training of every
# method at 60M, torch.compile, DDP on all visible GPUs, 1B dense vs factorized inference, a
# landscape point, checkpoint + resume on the GPU) in at most ~5 minutes on one GPU.
#
#   scripts/gpu_check.sh                      # writes bench-results/gpu_check.json, prints a table
#   scripts/gpu_check.sh --out DIR --budget-s 285 --compile-methods full
#
# Every option of `rankscope bench gpu` is accepted (see `rankscope bench gpu --help`). Exit status:
# 0 every path passed (or no CUDA device: then nothing else is checked), 1 a path failed or ran
# out of time, 2 bad arguments.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# This checkout's code, also when rankscope is not installed (or installed from elsewhere).
export PYTHONPATH="${root}/src${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python}" -m rankscope bench gpu "$@"
