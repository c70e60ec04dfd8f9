"""The report's comparisons on synthetic tables whose answers are worked out by hand: Holm's
adjustment, the one family, "not testable" below 3 seeds, the wording that depends on how the
learning rates were tuned, and ranking only where a corrected test separates two methods."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rankscope.report.regime import LITERATURE, LrChoice, Regime
from rankscope.report.significance import (
    NOT_SAME_BUDGET,
    comparison_display,
    comparison_words,
    family_statement,
    ranking_words,
    tuning_statement,
)
from rankscope.report.stats import compare_methods, format_number, holm_adjust

LABELS = {"val_loss": "val loss", "es_random": "expected sharpness (random)"}
FULL = [1.0, 1.1, 0.9]


def test_holm_adjust_hand_worked():
    # m = 4 finite p-values, sorted 0.005, 0.01, 0.03, 0.04 -> 4·0.005 = 0.02, 3·0.01 = 0.03,
    # 2·0.03 = 0.06, max(0.06, 1·0.04) = 0.06; the NaN is not a test and stays NaN.
    adjusted = holm_adjust([0.01, 0.04, 0.03, 0.005, math.nan])
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
    assert math.isnan(adjusted[4])
    # capped at 1, and monotone: 2·0.4 = 0.8, then max(0.8, 1·0.5) = 0.8
    assert holm_adjust([0.5, 0.4]) == pytest.approx([0.8, 0.8])
    assert holm_adjust([0.6, 0.7]) == pytest.approx([1.0, 1.0])
    assert holm_adjust([]).size == 0


def test_holm_adjust_rejects_what_the_step_down_procedure_rejects():
    """Oracle: Holm's procedure run directly (reject p_(i) while p_(i) ≤ α / (m − i + 1), stop at
    the first failure) rejects exactly the hypotheses whose adjusted p ≤ α, at every α."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = np.concatenate([rng.uniform(0, 0.02, rng.integers(0, 5)), rng.uniform(0, 1, rng.integers(1, 8))])
        adjusted = holm_adjust(p)
        for alpha in (0.01, 0.05, 0.1):
            rejected = set()
            for i, index in enumerate(np.argsort(p, kind="stable")):
                if p[index] > alpha / (p.size - i):
                    break
                rejected.add(int(index))
            assert rejected == set(np.flatnonzero(adjusted <= alpha).tolist())


def _table(methods: dict[str, dict[str, list[float]]]) -> pd.DataFrame:
    rows = []
    for method, metrics in methods.items():
        for seed in range(max(len(v) for v in metrics.values())):
            rows.append({"preset": "p", "method": method, **{m: v[seed] for m, v in metrics.items()}})
    return pd.DataFrame(rows)


def known_table() -> pd.DataFrame:
    """full; `big`: val loss 2 lower with the same spread (a huge effect); `mid`: 0.5 lower (a
    medium one); `null`: full's values exactly; `few`: a huge effect but 2 seeds. On expected
    sharpness every method equals full."""
    sharp = [5.0, 6.0, 7.0]
    return _table({"full": {"val_loss": FULL, "es_random": sharp},
                   "big": {"val_loss": [v - 2.0 for v in FULL], "es_random": sharp},
                   "mid": {"val_loss": [v - 0.5 for v in FULL], "es_random": sharp},
                   "null": {"val_loss": list(FULL), "es_random": sharp},
                   "few": {"val_loss": [-5.0, -5.1], "es_random": [5.0, 6.0]}})


def welch_p_by_hand(difference: float) -> float:
    """Welch's two-sided p of two groups of 3 values with variance 0.01 each whose means differ by
    `difference`: se² = 0.02 / 3, t² = difference² / se², and the Welch–Satterthwaite df is exactly
    4. For 4 degrees of freedom P(|T| < t) = sin θ (1 + cos² θ / 2) with sin θ = t / √(t² + 4)."""
    t_squared = difference ** 2 / (0.02 / 3)
    sin = math.sqrt(t_squared / (t_squared + 4))
    cos_squared = 4 / (t_squared + 4)
    return 1.0 - sin * (1.0 + cos_squared / 2)


def test_corrected_significance_of_a_known_table():
    table = compare_methods(known_table(), ["val_loss", "es_random"], ranking_metrics=["val_loss"])
    rows = table.set_index(["metric", "method", "other"])
    p_big, p_mid, p_big_mid = welch_p_by_hand(2.0), welch_p_by_hand(0.5), welch_p_by_hand(1.5)
    assert p_big == pytest.approx(stats.ttest_ind([v - 2 for v in FULL], FULL, equal_var=False).pvalue, rel=1e-9)
    assert rows.loc[("val_loss", "big", "full"), "p_value"] == pytest.approx(p_big, rel=1e-9)
    assert rows.loc[("val_loss", "mid", "full"), "p_value"] == pytest.approx(p_mid, rel=1e-9)
    assert rows.loc[("val_loss", "big", "mid"), "p_value"] == pytest.approx(p_big_mid, rel=1e-9)
    assert rows.loc[("val_loss", "big", "full"), "difference"] == pytest.approx(-2.0)
    # The family: on val loss big, mid, null vs full and the pairs big–mid, big–null, mid–null; on
    # expected sharpness big, mid, null vs full (t = 0, p = 1): m = 9 tests. `few` has 2 seeds, so
    # its comparisons are no tests and no members of the family.
    tested = table[table["status"] == "tested"]
    assert len(tested) == 9
    # Sorted: p_big (big–full, big–null) < p_big_mid < p_mid (mid–full, mid–null) < 1 (four times).
    # Holm by hand: 9·p_big, max(9·p_big, 8·p_big), 7·p_big_mid, 6·p_mid, max(6·p_mid, 5·p_mid),
    # then min(1, 4·1) = 1 for the rest.
    expected = {("val_loss", "big", "full"): 9 * p_big, ("val_loss", "big", "null"): 9 * p_big,
                ("val_loss", "big", "mid"): 7 * p_big_mid,
                ("val_loss", "mid", "full"): 6 * p_mid, ("val_loss", "mid", "null"): 6 * p_mid,
                ("val_loss", "null", "full"): 1.0, ("es_random", "big", "full"): 1.0,
                ("es_random", "mid", "full"): 1.0, ("es_random", "null", "full"): 1.0}
    for key, value in expected.items():
        assert rows.loc[key, "p_adjusted"] == pytest.approx(value, rel=1e-9), key
        assert bool(rows.loc[key, "separated"]) == (value < 0.05), key
    assert 6 * p_mid == pytest.approx(0.0216, abs=1e-4)  # separated after correction (9 · p_mid = 0.032 is not Holm)
    few = table[table["method"].eq("few") | table["other"].eq("few")]
    assert (few["status"] == "not testable").all() and few["p_value"].isna().all() and few["p_adjusted"].isna().all()
    assert "all 9 tests of the report" in family_statement(table) and "5 of 9 are" in family_statement(table)


def literature_regime(methods=("full", "big", "mid", "null", "few")) -> Regime:
    return _regime({m: LrChoice(1e-3, LITERATURE) for m in methods})


def _regime(choices: dict[str, LrChoice]) -> Regime:
    return Regime(pd.DataFrame([{"preset": "p", "method": m, "seeds": 3, "lr_choices": [c]} for m, c in choices.items()]))


def test_below_three_seeds_is_not_testable():
    two_seeds = _table({"full": {"val_loss": FULL[:2]}, "big": {"val_loss": [-9.0, -9.5]}})
    table = compare_methods(two_seeds, ["val_loss"], ranking_metrics=["val_loss"])
    assert table["status"].tolist() == ["not testable"] and table["p_value"].isna().all()
    assert not table["separated"].any()
    regime = literature_regime(("full", "big"))
    words = comparison_words(table, "p", regime, LABELS)
    assert words == ["**big** vs full (2 / 2 seeds): not testable — a test needs ≥ 3 seeds in each group; "
                     "the differences in the tables may be seed noise."]
    assert ranking_words(table, "p", regime, LABELS) == [
        "val loss: not testable — fewer than 3 seeds per method, so no order is given."]
    assert family_statement(table).startswith("No test was computed")
    assert comparison_display(table, "p", LABELS).empty  # no table of 'not testable' rows
    # The boundary: a third seed makes the same comparison a test.
    three_seeds = _table({"full": {"val_loss": FULL}, "big": {"val_loss": [-9.0, -9.5, -9.2]}})
    assert compare_methods(three_seeds, ["val_loss"], ["val_loss"])["status"].tolist() == ["tested"]


def test_a_lower_loss_is_not_called_better_unless_full_rank_was_tuned_on_the_same_budget():
    table = compare_methods(known_table(), ["val_loss", "es_random"], ranking_metrics=["val_loss"])
    adjusted = format_number(9 * welch_p_by_hand(2.0), 2)

    untuned = comparison_words(table, "p", literature_regime(), LABELS)
    big = next(line for line in untuned if line.startswith("**big**"))
    assert big.startswith(f"**big** vs full (3 / 3 seeds): lower val loss than full rank (by 2.000, Holm-adjusted p = {adjusted})")
    assert NOT_SAME_BUDGET in big and "better" not in big and "beat" not in big.replace(NOT_SAME_BUDGET, "")
    assert NOT_SAME_BUDGET in tuning_statement(literature_regime(), "p")
    assert NOT_SAME_BUDGET in " ".join(ranking_words(table, "p", literature_regime(), LABELS))

    # Full rank tuned, but on another budget than the method: still no "better".
    other_budget = _regime({"full": LrChoice(1e-3, "tuned", "5 lrs × 2 seeds × 200 steps"),
                            "big": LrChoice(1e-2, "tuned", "3 lrs × 1 seed × 50 steps"),
                            "mid": LrChoice(1e-3, "tuned", "5 lrs × 2 seeds × 200 steps"),
                            "null": LrChoice(1e-3, "tuned", "5 lrs × 2 seeds × 200 steps"),
                            "few": LrChoice(1e-3, "tuned", "5 lrs × 2 seeds × 200 steps")})
    line = next(w for w in comparison_words(table, "p", other_budget, LABELS) if w.startswith("**big**"))
    assert NOT_SAME_BUDGET in line and "better" not in line
    assert "big" in tuning_statement(other_budget, "p") and "null" not in tuning_statement(other_budget, "p").split(":")[-1]

    # Every lr tuned on one budget: now the difference may be called better, without the caveat.
    budget = "5 lrs × 2 seeds × 200 steps"
    same = _regime({m: LrChoice(1e-3, "tuned", budget) for m in ("full", "big", "mid", "null", "few")})
    line = next(w for w in comparison_words(table, "p", same, LABELS) if w.startswith("**big**"))
    assert line.startswith("**big** vs full (3 / 3 seeds): better than full rank on val loss (lower, by 2.000")
    assert "lrs tuned on the same budget" in line and NOT_SAME_BUDGET not in line
    assert NOT_SAME_BUDGET not in tuning_statement(same, "p") and budget in tuning_statement(same, "p")
    assert f"Holm-adjusted p = {adjusted};" in line
    # Full rank alone, or no full rank: no claim about budgets at all.
    alone = _regime({"full": LrChoice(1e-3, "tuned", budget)})
    headless = _regime({"big": LrChoice(1e-3, "tuned", budget)})
    for regime in (alone, headless):
        assert tuning_statement(regime, "p").startswith("No pair of full rank and another method")


def test_methods_are_ranked_only_where_the_corrected_test_separates_them():
    table = compare_methods(known_table(), ["val_loss", "es_random"], ranking_metrics=["val_loss"])
    (line,) = ranking_words(table, "p", literature_regime(), LABELS)
    assert line.startswith("val loss: separated pairs (Holm-adjusted p < 0.05): ")
    for pair in ("big < full", "big < null", "big < mid", "mid < full", "mid < null"):
        assert pair in line
    # full and null have identical values: no order between them, in either direction.
    assert "full < null" not in line and "null < full" not in line
    assert "Every other pair: not distinguishable at 3 seeds." in line
    assert "Pairs with a method of fewer than 3 seeds: not testable." in line

    # Nothing separated (a small effect in seed noise): no order at all.
    noisy = _table({"full": {"val_loss": [1.0, 1.5, 0.5]}, "a": {"val_loss": [1.1, 0.6, 1.4]},
                    "b": {"val_loss": [0.9, 1.6, 0.7]}})
    table = compare_methods(noisy, ["val_loss"], ranking_metrics=["val_loss"])
    assert not table["separated"].any() and (table["status"] == "tested").all()
    (line,) = ranking_words(table, "p", literature_regime(("full", "a", "b")), LABELS)
    assert line.startswith("val loss: no two methods are separated — not distinguishable at 3 seeds")
    assert "<" not in line
    words = comparison_words(table, "p", literature_regime(("full", "a", "b")), LABELS)
    assert words == ["**a** vs full (3 / 3 seeds): not distinguishable at 3 seeds on val loss.",
                     "**b** vs full (3 / 3 seeds): not distinguishable at 3 seeds on val loss."]


def test_no_spread_is_not_a_test():
    # Values fixed by the architecture are the same for every seed: scipy would give t = inf, p = 0.
    fixed = _table({"full": {"val_loss": FULL, "es_random": [2.0] * 3}, "a": {"val_loss": FULL, "es_random": [3.0] * 3}})
    table = compare_methods(fixed, ["val_loss", "es_random"], ranking_metrics=())
    row = table.set_index("metric").loc["es_random"]
    assert row["status"] == "no spread" and math.isnan(row["p_value"]) and not row["separated"]
    assert table.set_index("metric").loc["val_loss", "p_adjusted"] == 1.0  # a family of one test
