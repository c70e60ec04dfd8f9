"""Training step cost (time, tokens/s, periodic work, peak memory, optimizer state, MFU) of every method vs full-rank.

Same as `rankscope bench train`; every option of that command works here, e.g.
    python benchmarks/train_throughput.py --preset tiny --methods all --out bench-results
It prints a table and writes bench-results/train.{json,csv,png}; it asserts nothing.
"""

import sys

from rankscope.cli import main

if __name__ == "__main__":  # guard needed: the CPU memory pass spawns fresh processes
    raise SystemExit(main(["bench", "train", *sys.argv[1:]]))
