"""Cost of a landscape / interpolation point and spectral rows per second, per method.

Same as `rankscope bench analysis`; every option of that command works here, e.g.
    python benchmarks/analysis_cost.py --preset tiny --methods all --out bench-results
It prints a table and writes bench-results/analysis.{json,csv,png}; it asserts nothing.
"""

import sys

from rankscope.cli import main

if __name__ == "__main__":  # guard needed: the CPU memory pass spawns fresh processes
    raise SystemExit(main(["bench", "analysis", *sys.argv[1:]]))
