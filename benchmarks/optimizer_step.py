"""GaLore / Fira AdamW vs the reference packages, and LORO's exact step vs a dense SVD retraction.

Same as `rankscope bench optimizer`; every option of that command works here, e.g.
    python benchmarks/optimizer_step.py --preset tiny --methods all --out bench-results
It prints a table and writes bench-results/optimizer.{json,csv,png}; it asserts nothing.
"""

import sys

from rankscope.cli import main

if __name__ == "__main__":  # guard needed: the CPU memory pass spawns fresh processes
    raise SystemExit(main(["bench", "optimizer", *sys.argv[1:]]))
