#!/usr/bin/env bash
# The GPU check: every GPU-only path of rankscope in at most ~4 minutes on one GPU (see
# `rankscope.bench.gpu` for the list): the environment, torch.compile, bf16-pure and bf16-autocast
# training of every method, fp32 optimizer state, the dynamics measurement's memory, the trainer's
# resume / RNG / ReLoRA warm start, 1B memory with activation checkpointing, the projector refresh,
# throughput and MFU, a process group, DDP on all visible GPUs, 1B inference, a landscape point.
#
#   scripts/gpu_check.sh                      # writes bench-results/gpu_check.json, prints a table
#   scripts/gpu_check.sh --out DIR --budget-s 240 --limit compile=90
#   PYTHON=/opt/venv/bin/python scripts/gpu_check.sh
#
# Every option of `rankscope bench gpu` is accepted (see `rankscope bench gpu --help`). The
# interpreter is $PYTHON, else `python`, else `python3` (GPU images often have only the latter).
# Exit status: 0 every path passed (or no CUDA device: then nothing else is checked), 1 a path
# failed or ran out of time, 2 bad arguments (or no Python found).
set -euo pipefail
# No external commands before Python starts (dirname, which): the GPU image may have few.
script_dir="${BASH_SOURCE[0]%/*}"
[[ "${script_dir}" == "${BASH_SOURCE[0]}" ]] && script_dir=.
root="$(cd "${script_dir}/.." && pwd)"
# This checkout's code, also when rankscope is not installed (or installed from elsewhere).
export PYTHONPATH="${root}/src${PYTHONPATH:+:${PYTHONPATH}}"
python_bin="${PYTHON:-}"
if [[ -z "${python_bin}" ]]; then
  if command -v python >/dev/null 2>&1; then
    python_bin=python
  elif command -v python3 >/dev/null 2>&1; then
    python_bin=python3
  else
    echo "gpu_check.sh: neither python nor python3 is on PATH; set PYTHON to the interpreter with torch" >&2
    exit 2
  fi
fi
exec "${python_bin}" -m rankscope bench gpu "$@"
