"""The report's findings and significance map: every statement is backed by a separated test (or a
reading against the seed baseline) and carries its effect size, adjusted p, seeds and reference;
the map's cells are the standardised differences computed by hand; estimates that did not
converge are shown marked and kept out of the tests and the findings."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from test_report import make_study

from rankscope.report import build_report
from rankscope.report.findings import (
    ScaleEvidence,
    _distance_lines,
    cost,
    evidence_line,
    in_short,
    prediction,
    same_solution,
)
from rankscope.report.significance_map import COLUMNS, NOT_CONVERGED, colour, map_display, pooled_d
from rankscope.report.tables import METRIC_LABELS

REFS = {"sigmap-tiny": "[[sigmap-tiny]]", "results-tiny": "[[results-tiny]]", "distance-tiny": "[[distance-tiny]]",
        "tests": "[[tests]]", "predictor": "[[predictor]]"}


def refs(label: str) -> str:
    return REFS.get(label, "")


def _cell(method, metric, cell, d=math.nan, difference=math.nan, p=math.nan, kind="test", n=(3, 3), reason=""):
    return {"preset": "tiny", "method": method, "metric": metric, "kind": kind, "d": d, "difference": difference,
            "p_adjusted": p, "n_method": n[0], "n_other": n[1], "cell": cell, "reason": reason}


class _Regime:
    """The two questions the findings ask a Regime."""

    def __init__(self, same_budget: bool, chance: float = 0.25):
        self._same = same_budget
        self.chance = pd.DataFrame({"task": ["a"], "chance": [chance]})

    def same_budget(self, preset, method, reference="full"):
        return self._same


def _scale(cells, same_budget=False, results=None) -> ScaleEvidence:
    results = results if results is not None else pd.DataFrame({
        "method": ["full", "galore", "lowrank", "frozen"], "control": [False, False, False, True],
        "optimizer_state_bytes": [1000.0, 700.0, 500.0, 100.0], "estimated_memory_bytes": [2000.0, 1600.0, 1300.0, 900.0],
        "tokens_per_sec_mean": [100.0, 80.0, 120.0, 150.0], "downstream_acc_mean": [0.30, 0.29, 0.33, 0.26]})
    return ScaleEvidence("tiny", pd.DataFrame(cells, columns=COLUMNS), results, _Regime(same_budget))


def test_a_separated_metric_is_stated_with_its_evidence_and_a_quiet_method_is_not_called_equal():
    cells = [_cell("galore", "effective_rank_w", "separated", d=-4.2, difference=-12.5, p=0.012),
             _cell("lowrank", "effective_rank_w", "separated", d=-2.1, difference=-6.0, p=0.003),
             _cell("galore", "es_random", "not separated", d=0.4, difference=1e-4, p=0.8),
             _cell("fira", "effective_rank_w", "not separated", d=0.3, difference=1.0, p=1.0),
             _cell("fira", "es_random", "not separated", d=-0.2, difference=-1e-5, p=1.0),
             _cell("cola", "es_random", "not testable", n=(2, 3))]
    lines = same_solution(_scale(cells), METRIC_LABELS, refs)
    assert lines[0] == ("**effective rank of W** lower than full rank: lowrank (d = -2.1, p = 0.0030), galore "
                        "(d = -4.2, p = 0.012); 3 seeds ([[sigmap-tiny]]).")
    assert not any("expected sharpness" in line for line in lines)  # not separated: never a finding
    quiet = next(line for line in lines if line.startswith("**fira**"))
    assert "no tested metric separates it from full rank at 3 seeds" in quiet and "not the same as shown equal" in quiet
    assert any(line.startswith("**cola**: not testable") for line in lines)


def test_distances_are_read_against_the_seed_baseline_and_said_not_to_be_tests():
    cells = [_cell("galore", "cka_last_layer", "outside seed range", d=-2.5, difference=-0.02, kind="distance",
                   n=(6, 3), reason="farther than seed baseline"),
             _cell("fira", "cka_last_layer", "within seed range", d=0.1, difference=0.001, kind="distance", n=(6, 3),
                   reason="within seed baseline")]
    lines = _distance_lines(_scale(cells), METRIC_LABELS, refs)
    assert lines[0] == ("**CKA to full-rank (last layer)**: farther from full rank than two full-rank seeds are to each "
                        "other: galore (d = -2.5) ([[distance-tiny]]).")
    assert "not a test" in lines[1]
    assert lines[2].startswith("**fira**: within the seed range on every distance")


def test_loss_is_better_or_worse_only_with_same_budget_tuning_and_costs_are_ratios_to_full():
    cells = [_cell("lowrank", "val_loss", "separated", d=-3.0, difference=-0.05, p=0.01),
             _cell("galore", "val_loss", "not separated", d=0.5, difference=0.01, p=0.6)]
    untuned = cost(_scale(cells, same_budget=False), METRIC_LABELS, refs)
    assert untuned[0].startswith("**lowrank**: lower val loss than full rank (Δ -0.0500, d = -3.0, adj. p = 0.010, "
                                 "3 vs 3 seeds) — full rank not tuned on the same budget")
    assert "better" not in untuned[0]
    tuned = cost(_scale(cells, same_budget=True), METRIC_LABELS, refs)
    assert tuned[0].startswith("**lowrank**: better than full rank on val loss")
    assert tuned[1] == "val loss: **galore** not distinguishable from full rank at 3 seeds."
    # Ratios to full rank, controls left out; byte counts are exact, throughput is not tested.
    assert "galore 0.70×" in tuned[2] and "lowrank 0.50×" in tuned[2] and "frozen" not in tuned[2]
    assert "0.65× to 0.80×" in tuned[3]
    assert "0.80× to 1.20×" in tuned[4] and "not tested" in tuned[4]


def test_downstream_accuracy_is_set_against_chance_without_naming_the_highest():
    lines = prediction(_scale([]), METRIC_LABELS, refs)
    assert lines == ["Mean downstream accuracy 29.0–33.0 % over the methods ([[results-tiny]]), against a chance level "
                     "of 25.0 %: the highest method mean is +8.0 points above chance."]


def test_how_sure_names_the_family_and_every_estimate_left_out():
    comparison = pd.DataFrame({"status": ["tested"] * 4 + ["not testable"], "separated": [True, False, False, True, False]})
    exclusions = pd.DataFrame({"preset": ["tiny"] * 3, "method": ["galore", "lowrank", "frozen"],
                               "metric": ["hessian_max_eigenvalue"] * 3, "runs": [2, 1, 3],
                               "reason": ["Lanczos did not converge"] * 3})
    lines = evidence_line(comparison, exclusions, METRIC_LABELS, refs)
    assert lines[0].startswith("How sure: 4 two-sided Welch tests over seeds in one Holm-corrected family")
    assert "2 separated ([[tests]])" in lines[0]
    assert lines[1] == ("Left out of the tests and findings: Hessian largest eigenvalue of galore (2 runs), lowrank "
                        "(1 run) — Lanczos did not converge.")  # the control is never a finding
    nothing = evidence_line(comparison.assign(status="not testable"), exclusions.iloc[:0], METRIC_LABELS, refs)
    assert nothing[0].startswith("**No test was computed**")


def test_pooled_d_by_hand_and_grey_for_what_cannot_be_read():
    assert pooled_d(1.0, 0.3, 0.4) == pytest.approx(1.0 / math.sqrt((0.09 + 0.16) / 2))
    assert math.isnan(pooled_d(1.0, 0.0, 0.0))
    assert colour(2.0, "not testable") == colour(math.nan, "separated") == "#d9d9d9"
    # Not separated is drawn paler than the same d separated: only separated cells read as findings.
    strong, faded = colour(2.0, "separated"), colour(2.0, "not separated")
    assert sum(int(strong[i:i + 2], 16) for i in (1, 3, 5)) < sum(int(faded[i:i + 2], 16) for i in (1, 3, 5))
    table, styles = map_display(pd.DataFrame([_cell("galore", "es_random", "separated", d=2.04, p=0.01),
                                              _cell("galore", "val_loss", NOT_CONVERGED, reason="r")]), METRIC_LABELS)
    assert table.iloc[0].tolist() == ["galore", "+2.0*", "n.c."]
    assert "background:#d9d9d9" in styles.iloc[0, 2]


def _unconverged(study, method: str, seeds) -> None:
    """Mark `method`'s largest-eigenvalue estimates of `seeds` as not converged (as a short Lanczos would)."""
    for seed in seeds:
        path = study / "runs" / f"{method}-tiny-s{seed}" / "analysis" / "hessian.csv"
        table = pd.read_csv(path, dtype={"reason": object})
        rows = table["metric"] == "max_eigenvalue"
        table.loc[rows, "converged"] = False
        table.loc[rows, "reason"] = "Lanczos did not converge in 3 HVPs (relative residual 0.41 > 0.01)"
        table.to_csv(path, index=False)


@pytest.fixture(scope="module")
def report_with_unconverged(tmp_path_factory):
    study, _ = make_study(tmp_path_factory.mktemp("unconverged"), seeds=(0, 1, 2), predictor=False)
    _unconverged(study, "galore", (0, 1))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("rankscope.methods.tuned.tuned_table", lambda: {})
        report = build_report(study)
    return report, (report / "report.md").read_text()


def test_an_unconverged_estimate_is_shown_marked_and_never_tested_or_stated(report_with_unconverged):
    report, markdown = report_with_unconverged
    significance = pd.read_csv(report / "tables" / "significance.csv")
    row = significance[(significance["metric"] == "hessian_max_eigenvalue") & (significance["method"] == "galore")]
    assert row["status"].tolist() == ["not testable"] and row["n_method"].tolist() == [1]  # one converged seed left
    trace = significance[(significance["metric"] == "hessian_trace") & (significance["method"] == "galore")]
    assert trace["n_method"].tolist() == [3]  # the converged estimates of the same runs stay
    cells = pd.read_csv(report / "tables" / "significance_map_tiny.csv").set_index(["method", "metric"])
    assert cells.loc[("galore", "hessian_max_eigenvalue"), "cell"] == NOT_CONVERGED
    assert "Lanczos did not converge" in cells.loc[("galore", "hessian_max_eigenvalue"), "reason"]
    geometry = pd.read_csv(report / "tables" / "geometry_tiny.csv").set_index("method")
    assert geometry.loc["galore", "Hessian largest eigenvalue"].endswith("†")
    assert not geometry.loc["full", "Hessian largest eigenvalue"].endswith("†")
    assert "galore, Hessian largest eigenvalue: † 2 of 3 runs did not converge — Lanczos did not converge" in markdown
    findings = markdown.split("## Findings")[1].split("\n## ")[0]
    assert ("Left out of the tests and findings: Hessian largest eigenvalue of galore (2 runs) — Lanczos did not "
            "converge in 3 HVPs") in findings
    statements = [line for line in findings.splitlines() if "Hessian largest eigenvalue" in line]
    assert len(statements) == 1  # only the line that says it was left out


def test_the_map_matches_the_tests_and_the_hand_computed_d(report_with_unconverged):
    report, _ = report_with_unconverged
    runs = pd.read_csv(report / "tables" / "runs.csv")
    significance = pd.read_csv(report / "tables" / "significance.csv")
    cells = pd.read_csv(report / "tables" / "significance_map_tiny.csv")
    checked = 0
    for row in cells[cells["cell"].isin(["separated", "not separated"])].itertuples():
        test = significance[(significance["metric"] == row.metric) & (significance["method"] == row.method)
                            & (significance["other"] == "full")].iloc[0]
        assert (row.cell == "separated") == bool(test["separated"])
        mine = runs.loc[(runs["method"] == row.method) & np.isfinite(runs["val_loss"]), row.metric].dropna()
        full = runs.loc[(runs["method"] == "full") & np.isfinite(runs["val_loss"]), row.metric].dropna()
        expected = (mine.mean() - full.mean()) / math.sqrt((mine.var(ddof=1) + full.var(ddof=1)) / 2)
        assert row.d == pytest.approx(expected, rel=1e-9), row.metric
        checked += 1
    assert checked >= 5 and (cells["cell"] == "separated").any()


def test_in_short_counts_what_the_statements_state():
    cells = [_cell("galore", "effective_rank_w", "separated", d=-4.2, difference=-12.5, p=0.012),
             _cell("lowrank", "effective_rank_w", "separated", d=-2.1, difference=-6.0, p=0.003),
             _cell("lowrank", "es_random", "separated", d=3.0, difference=1e-4, p=0.04),
             _cell("fira", "effective_rank_w", "not separated", d=0.3, difference=1.0, p=1.0),
             _cell("galore", "val_loss", "not separated", d=0.5, difference=0.01, p=0.6),
             _cell("lowrank", "val_loss", "separated", d=-3.0, difference=-0.05, p=0.01),
             _cell("fira", "val_loss", "not separated", d=0.1, difference=0.001, p=1.0),
             _cell("galore", "cka_last_layer", "outside seed range", d=-2.5, kind="distance",
                   reason="farther than seed baseline"),
             _cell("lowrank", "cka_last_layer", "outside seed range", d=2.5, kind="distance",
                   reason="closer than seed baseline")]
    lines = in_short(_scale(cells), METRIC_LABELS, refs)
    assert lines[0] == ("Same solution: 2 of 3 methods differ from full rank on at least one tested metric of the "
                        "solution (most often effective rank of W: 2 methods); 1 lies farther from full rank than two "
                        "full-rank seeds on at least one distance ([[sigmap-tiny]]).")
    assert lines[1] == ("Cost in loss: 1 of 3 methods separated from full rank on val loss at 3 seeds; optimizer "
                        "state 0.50× to 0.70× full rank's.")
    untested = in_short(_scale([_cell("galore", "val_loss", "not testable", n=(2, 2))]), METRIC_LABELS, refs)
    assert untested == ["1 method against full rank: not testable here (fewer than 3 seeds with a value per group) — "
                        "no difference is a finding."]
