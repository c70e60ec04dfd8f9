#!/usr/bin/env python
"""Rewrite the golden loss curves of tests/assets/golden_losses/ (one file per registered method).

    python scripts/regenerate_golden_losses.py                 # every registered method
    python scripts/regenerate_golden_losses.py galore loro     # only these
    python scripts/regenerate_golden_losses.py --check-lr-sensitivity   # writes nothing

Run it only on purpose: when a change is meant to alter training numerically (a fixed bug, a new
default), and say so in the commit. tests/train/test_golden_losses.py compares every method's
first steps with these files (the run: tests/golden_losses.py). `--check-lr-sensitivity` trains each
method with every lr x1.01 and prints how far its curve moves from the stored one, against the
test's tolerance: each must move further than the tolerance, or the test could not see such a change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from golden_losses import RTOL, golden_losses, max_relative_difference, read_golden, write_golden  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from rankscope import methods

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="*", help="methods to rewrite (default: every registered method)")
    parser.add_argument("--check-lr-sensitivity", action="store_true",
                        help="write nothing; show how far lr x1.01 moves each curve, against the tolerance")
    args = parser.parse_args(argv)
    names = args.methods or methods.names()
    unknown = [n for n in names if n not in methods.names()]
    if unknown:
        parser.error(f"unknown methods {unknown}; registered: {', '.join(methods.names())}")
    failed = []
    for name in names:
        if args.check_lr_sensitivity:
            stored = read_golden(name)
            if stored is None:
                print(f"{name}: no golden file yet")
                continue
            same = max_relative_difference(golden_losses(name), stored["loss"])
            moved = max_relative_difference(golden_losses(name, lr_scale=1.01), stored["loss"])
            verdict = "ok" if moved > RTOL and same <= RTOL else "NOT DETECTED" if moved <= RTOL else "NOT REPRODUCED"
            if verdict != "ok":
                failed.append(name)
            print(f"{name:12s} rerun {same:.2e}   lr x1.01 {moved:.2e}   tolerance {RTOL:.0e}   {verdict}", flush=True)
        else:
            path = write_golden(name, golden_losses(name))
            print(f"{name}: wrote {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
