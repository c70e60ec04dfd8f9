"""Golden loss curves: every registered method's first training losses on a tiny CPU run stay what
they were when tests/assets/golden_losses/ was written (a change that trains differently, though it
still learns, fails here). The run and the tolerance: tests/golden_losses.py."""

import pytest

from golden_losses import (  # tests/ is on sys.path
    GOLDEN_DIR,
    REGENERATE,
    RTOL,
    STEPS,
    golden_losses,
    golden_path,
    max_relative_difference,
    read_golden,
)
from rankscope import methods


@pytest.mark.parametrize("method", methods.names())
def test_first_losses_match_the_golden_curve(method):
    stored = read_golden(method)
    if stored is None:  # a method just added: the suite passes, and -ra lists this as a skip to act on
        pytest.skip(f"no golden curve for {method!r} yet; write it with `{REGENERATE} {method}` once its training is right")
    assert len(stored["loss"]) == STEPS
    losses = golden_losses(method)
    difference = max_relative_difference(losses, stored["loss"])
    assert difference <= RTOL, (
        f"{method}: the first {STEPS} training losses moved by up to {difference:.2e} (relative; tolerance {RTOL:.0e}) "
        f"from {golden_path(method)}.\n  now:    {[round(x, 6) for x in losses]}\n  stored: "
        f"{[round(x, 6) for x in stored['loss']]}\nIf the change is meant to alter training, rewrite the file with "
        f"`{REGENERATE} {method}` and say why in the commit; otherwise it is a regression."
    )


def test_a_one_percent_lr_change_is_detected():
    """The tolerance is tight enough to see a 1% lr change (measured for every method by
    `scripts/regenerate_golden_losses.py --check-lr-sensitivity`; here for one, to keep it cheap)."""
    stored = read_golden("galore")
    assert stored is not None
    assert max_relative_difference(golden_losses("galore", lr_scale=1.01), stored["loss"]) > 10 * RTOL


def test_every_golden_file_belongs_to_a_registered_method():
    stale = sorted(path.stem for path in GOLDEN_DIR.glob("*.json") if path.stem not in methods.names())
    assert not stale, f"golden curves of methods no longer registered: {stale}; delete them"
    assert {path.stem for path in GOLDEN_DIR.glob("*.json")}, "no golden curves at all"
