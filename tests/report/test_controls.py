"""Controls in the report: the `frozen` control (block matrices at init, only embeddings, head and
norms train) is a reference row, never tested or ranked, and the verdict it gives — can this
regime tell methods apart at all? — is stated before any ranking. Synthetic study folders from
test_report.py's writer, with the control's val loss placed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_report import OFFSET, _drop_analysis, _pixels_of, make_study

from rankscope.report import build_report
from rankscope.report.collect import Study, is_control, method_label, sorted_methods
from rankscope.report.figures.base import line_style, method_color
from rankscope.report.informativeness import (
    CAN_SEPARATE,
    CANNOT_SEPARATE,
    NOT_CHECKED,
    informative_margin,
    informativeness,
)
from rankscope.report.regime import LITERATURE, LrChoice, Regime
from rankscope.report.significance import comparison_words, ranking_words
from rankscope.report.stats import compare_methods, format_number

SEEDS = (0, 1, 2)
CANNOT = "This regime cannot tell apart methods that differ only in the block matrices"
CAN = "This regime can separate methods by what they do to the block matrices"


def _build(root: Path, control_offset: float | None, keep_analysis: bool = False) -> tuple[Path, str]:
    """A study of full, galore (+ frozen at `control_offset` nats above full rank's loss) with 3
    seeds, reported; returns (report folder, report.md)."""
    methods = ("full", "galore") if control_offset is None else ("full", "galore", "frozen")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(OFFSET, "frozen", control_offset if control_offset is not None else 0.0)
        patch.setattr("rankscope.methods.tuned.tuned_table", lambda: {})  # the literature's lrs
        study, _ = make_study(root, methods=methods, seeds=SEEDS, predictor=False)
        if not keep_analysis:
            _drop_analysis(study)  # the verdict needs val losses only; fewer figures keep the test quick
        report = build_report(study)
    return report, (report / "report.md").read_text()


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    # The control 0.1 nats behind full rank (the best method): inside the default 0.2 margin.
    return _build(tmp_path_factory.mktemp("tied"), control_offset=0.1, keep_analysis=True)


@pytest.fixture(scope="module")
def far(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("far"), control_offset=1.5)


def _section(markdown: str, heading: str, end: str = "\n## ") -> str:
    start = markdown.index(heading)
    stop = markdown.find(end, start + len(heading))
    return markdown[start:stop if stop >= 0 else None]


def _ranking(markdown: str) -> str:
    return _section(markdown, "### Ranking", "\n### ")


def _val_losses(report: Path, method: str) -> np.ndarray:
    runs = pd.read_csv(report / "tables" / "runs.csv")
    return runs.loc[runs["method"] == method, "val_loss"].to_numpy(dtype=float)


def test_frozen_is_a_control_and_unknown_names_are_methods():
    assert is_control("frozen") and not is_control("full") and not is_control("galore")
    assert not is_control("a-method-this-installation-does-not-know")
    assert sorted_methods(["frozen", "galore", "full", "cola"]) == ["full", "cola", "galore", "frozen"]
    assert method_label("frozen") == "frozen (control)" and method_label("galore") == "galore"
    assert line_style("frozen") == "--" and line_style("galore") == line_style("full") == "-"


def test_a_control_that_ties_the_best_method_says_the_regime_cannot_tell_methods_apart(tied):
    report, markdown = tied
    control, full = _val_losses(report, "frozen"), _val_losses(report, "full")
    gap = control.mean() - full.mean()
    assert 0 < gap < 0.2  # the setup: full rank is the best method, the control within the margin
    verdict = pd.read_csv(report / "tables" / "informativeness.csv").iloc[0]
    assert verdict["verdict"] == CANNOT_SEPARATE and verdict["best_method"] == "full"
    assert verdict["control_method"] == "frozen" and verdict["control_seeds"] == 3 and verdict["margin"] == 0.2
    assert verdict["control_mean"] == pytest.approx(control.mean(), rel=1e-12)
    assert verdict["control_std"] == pytest.approx(np.std(control, ddof=1), rel=1e-9)
    assert verdict["gap_control_minus_best"] == pytest.approx(gap, rel=1e-9)
    # Stated in the Regime section of the scale, with its numbers ...
    regime = _section(markdown, "## Regime")
    assert f"**{CANNOT}:**" in regime
    assert f"within {format_number(gap, 3)} nats of the best method, full (val loss {format_number(full.mean())}" in regime
    assert "the informative margin is 0.200 nats" in regime
    # ... and again before the ranking's first bullet, as a caveat.
    ranking = _ranking(markdown)
    caveat, first_bullet = ranking.index("**Caveat before any ranking.**"), ranking.index("\n- ")
    assert caveat < ranking.index(CANNOT) < first_bullet


def test_a_control_far_behind_says_the_regime_can_separate_methods(far):
    report, markdown = far
    verdict = pd.read_csv(report / "tables" / "informativeness.csv").iloc[0]
    assert verdict["verdict"] == CAN_SEPARATE and verdict["gap_control_minus_best"] > 1.0
    assert not verdict["control_beats_full"]
    assert f"**{CAN}:**" in _section(markdown, "## Regime") and CANNOT not in markdown
    ranking = _ranking(markdown)
    assert ranking.index(CAN) < ranking.index("\n- ") and "Caveat" not in ranking


def test_without_a_control_the_report_says_it_was_not_checked(tmp_path):
    report, markdown = _build(tmp_path, control_offset=None)
    verdict = pd.read_csv(report / "tables" / "informativeness.csv").iloc[0]
    assert verdict["verdict"] == NOT_CHECKED and pd.isna(verdict["control_method"])
    sentence = "**Whether this regime can separate the methods was not checked** at scale tiny: the study has no control"
    assert sentence in _section(markdown, "## Regime") and "`controls: [frozen]`" in markdown
    assert _ranking(markdown).index(sentence) < _ranking(markdown).index("\n- ")


def test_the_control_is_a_reference_row_never_tested_or_ranked(tied):
    report, markdown = tied
    significance = pd.read_csv(report / "tables" / "significance.csv")
    assert "frozen" not in set(significance["method"]) | set(significance["other"])
    assert "galore" in set(significance["method"])  # the methods are still compared
    ranking_bullets = [line for line in _ranking(markdown).splitlines() if line.startswith("- ")]
    assert ranking_bullets and not any("frozen" in line for line in ranking_bullets)
    # Neither the map nor the findings hold it: they compare methods with full rank.
    cells = pd.read_csv(report / "tables" / "significance_map_tiny.csv")
    assert set(cells["method"]) == {"galore"}
    findings = _section(markdown, "## Findings")
    assert "galore" in findings and "frozen" not in findings
    # Shown as a marked reference row, last, in the results table and in the verdict's table.
    results = pd.read_csv(report / "tables" / "results_tiny.csv")
    assert list(results["method"]) == ["full", "galore", "frozen"] and list(results["control"]) == [False, False, True]
    assert "| frozen (control) |" in _section(markdown, "### Results", "\n### ")
    assert pd.read_csv(report / "tables" / "informativeness.csv")["control_method"].tolist() == ["frozen"]
    # Geometry tables may show it, marked.
    assert pd.read_csv(report / "tables" / "geometry_tiny.csv")["method"].tolist() == ["full", "galore", "frozen (control)"]
    # The loss curves draw it, in its own grey (dashed: line_style).
    assert _pixels_of(report / "figures" / "training_loss_tiny.png", method_color("frozen")) > 50
    assert "Dashed grey: the control (frozen" in markdown


def test_the_words_leave_out_a_control_even_in_a_comparison_that_holds_one():
    """comparison_words / ranking_words guard themselves: a comparison table built without
    study_comparison (which drops controls) still never words or ranks a control."""
    rows = [{"preset": "tiny", "method": m, "val_loss": v}
            for m, values in (("full", [4.0, 4.01, 3.99]), ("galore", [4.4, 4.41, 4.39]), ("frozen", [3.0, 3.01, 2.99]))
            for v in values]
    comparison = compare_methods(pd.DataFrame(rows), ["val_loss"], ["val_loss"])
    assert "frozen" in set(comparison["method"]) | set(comparison["other"])  # the guard has something to do
    table = pd.DataFrame([{"preset": "tiny", "method": m, "seeds": 3, "val_ppl_mean": 50.0,
                           "lr_choices": [LrChoice(1e-3, LITERATURE)]} for m in ("full", "galore", "frozen")])
    regime = Regime(table)
    words = comparison_words(comparison, "tiny", regime, {"val_loss": "val loss"})
    ranking = ranking_words(comparison, "tiny", regime, {"val_loss": "val loss"})
    assert any("**galore** vs full" in w for w in words) and any("full < galore" in r for r in ranking)
    assert not any("frozen" in line for line in words + ranking)


def _study(rows: list[tuple[str, float]], tmp_path: Path) -> Study:
    runs = pd.DataFrame([{"run": f"{m}-tiny-s{i}", "method": m, "preset": "tiny", "seed": i, "val_loss": v}
                         for i, (m, v) in enumerate(rows)])
    return Study(tmp_path, runs, {}, pd.DataFrame(), pd.DataFrame(), None)


def test_the_verdict_compares_the_control_with_the_best_method_at_the_margin(tmp_path):
    full, best = [4.0, 4.2, 4.1], [3.9, 3.8, 4.0]  # the best method is galore (mean 3.9), not full rank
    base = [("full", v) for v in full] + [("galore", v) for v in best]
    behind = informativeness(_study(base + [("frozen", v) for v in (4.2, 4.3, 4.25)], tmp_path), "tiny", 0.2)
    assert behind.informative and behind.gap == pytest.approx(4.25 - 3.9) and behind.gap_to_full == pytest.approx(0.15)
    assert behind.best.method == "galore" and behind.control.seeds == 3
    text = behind.sentence()
    assert f"**{CAN}:**" in text and "0.350 nats behind the best method, galore (val loss 3.900 ± 0.10 over 3 seeds)" in text
    assert "It is 0.150 nats behind full rank (val loss 4.100 ± 0.10 over 3 seeds)." in text
    # Exactly at the margin (best >= control - margin): cannot separate; just past it: can. (Values
    # exact in binary, so the boundary is not decided by rounding.)
    exact = [("full", v) for v in (3.5, 3.75, 4.0)]
    at_margin = informativeness(_study(exact + [("frozen", v) for v in (3.75, 4.0, 4.25)], tmp_path), "tiny", 0.25)
    assert at_margin.gap == 0.25 and at_margin.informative is False
    past = informativeness(_study(exact + [("frozen", v) for v in (3.75, 4.0, 4.25)], tmp_path), "tiny", 0.125)
    assert past.informative is True
    # A control ahead of full rank: said explicitly, whatever the verdict.
    ahead = informativeness(_study(base + [("frozen", v) for v in (3.95, 3.96, 3.97)], tmp_path), "tiny", 0.2)
    assert ahead.informative is False and ahead.control_beats_full
    assert "**The control beats full rank** by 0.140 nats" in ahead.sentence()
    assert "within 0.0600 nats of the best method, galore" in ahead.sentence()
    beyond = informativeness(_study(base + [("frozen", v) for v in (3.5, 3.6, 3.7)], tmp_path), "tiny", 0.2)
    assert "ends 0.300 nats *ahead* of the best method, galore" in beyond.sentence()
    assert beyond.row()["verdict"] == CANNOT_SEPARATE
    # A control with no finished run is named, and nothing is checked.
    unfinished = _study(base + [("frozen", math.nan)], tmp_path)
    verdict = informativeness(unfinished, "tiny", 0.2)
    assert verdict.informative is None and "the control (frozen) has no finished run here" in verdict.sentence()


def test_the_margin_comes_from_regime_json_then_study_yaml_then_the_default(tmp_path):
    assert informative_margin(tmp_path) == 0.2
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"name": "s", "report": {"informative_margin": 0.35}}))
    assert informative_margin(tmp_path) == 0.35
    (tmp_path / "regime.json").write_text(json.dumps({"informative_margin": 0.05, "runs": {}}))
    assert informative_margin(tmp_path) == 0.05
    (tmp_path / "regime.json").write_text(json.dumps({"runs": {}}))  # an older regime.json
    assert informative_margin(tmp_path) == 0.35
