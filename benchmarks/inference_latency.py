"""Forward latency of every method's final model over a batch x sequence-length grid vs full-rank.

Same as `rankscope bench infer`; every option of that command works here, e.g.
    python benchmarks/inference_latency.py --preset tiny --methods all --out bench-results
It prints a table and writes bench-results/infer.{json,csv,png}; it asserts nothing.
"""

import sys

from rankscope.cli import main

if __name__ == "__main__":  # guard needed: the CPU memory pass spawns fresh processes
    raise SystemExit(main(["bench", "infer", *sys.argv[1:]]))
