"""The report's tuning section and figure, from a made-up tune folder (no training)."""

import json
import math

import pandas as pd
import pytest

from rankscope.report.document import Document, render_markdown
from rankscope.report.figures.tuning import tuning_curve
from rankscope.report.tuning import tuning_section


def _tune_folder(study_dir):
    tune = study_dir / "tune"
    tune.mkdir(parents=True)
    rows = []
    for method, scores in {"full": {0.001: 5.0, 0.002: 4.6, 0.004: 4.4, 0.008: "diverged"},
                           "galore": {0.005: 5.2, 0.01: 5.0, 0.02: 4.9}}.items():
        for lr, score in scores.items():
            rows.append({"method": method, "preset": "tiny", "point": f"lr{lr:g}", "optim.lr": lr, "seed": 0,
                         "phase": "grid", "state": "diverged" if score == "diverged" else "done",
                         # A run that ended worse than it started diverged, though its score is a number.
                         "score": 7.5 if score == "diverged" else score, "run": f"{method}-tiny-lr{lr:g}-s0"})
    rows.append({"method": "full", "preset": "tiny", "point": "lr0.004", "optim.lr": 0.004, "seed": 1,
                 "phase": "refine", "state": "done", "score": 4.5, "run": "full-tiny-lr0.004-s1"})
    pd.DataFrame(rows).to_csv(tune / "results.csv", index=False)
    chosen = {"metric": "val_loss", "seeds": [0], "refine_seeds": [1], "max_extensions": 2, "cells": [
        {"method": "full", "preset": "tiny", "values": {"optim.lr": 0.004}, "score": 4.45, "score_std": 0.0707,
         "seeds": [0, 1], "defaults": {"optim.lr": 0.001}, "diverged_runs": 1, "failed_runs": 0, "at_edge": {},
         "note": ""},
        {"method": "galore", "preset": "tiny", "values": {"optim.lr": 0.02}, "score": 4.9, "score_std": None,
         "seeds": [0], "defaults": {"optim.lr": 0.01}, "diverged_runs": 0, "failed_runs": 0,
         "at_edge": {"optim.lr": {"side": "high", "reason": "tune.max_extensions (2) reached"}}, "note": ""}]}
    (tune / "chosen.json").write_text(json.dumps(chosen))


def test_the_tuning_section_tabulates_choices_flags_edges_and_draws_the_figure(tmp_path):
    _tune_folder(tmp_path)
    (tmp_path / "figures").mkdir()
    (tmp_path / "tables").mkdir()
    document = Document()
    tuning_section(document, tmp_path, tmp_path / "figures", tmp_path / "tables")
    text = render_markdown(document, "t")
    table = pd.read_csv(tmp_path / "tables" / "tuning.csv")
    assert list(table["method"]) == ["full", "galore"]
    full = table.iloc[0]
    assert full["chosen"] == "lr=0.004" and full["default"] == "lr=0.001" and full["diverged runs"] == 1
    assert full["tried"] == "lr 0.001..0.008 (4)" and full["val_loss (seeds)"] == "4.4500 ± 0.0707 (2)"
    assert table.iloc[1]["on an edge"] == "lr high"
    assert "`galore` at tiny: the choice sits on the high edge of `optim.lr`" in text
    assert (tmp_path / "figures" / "tuning_tiny.png").is_file() and "tuning_tiny.png" in text
    assert "share seed" not in text  # no regime.json: the study's seeds are not known
    assert "Tuning protocol **independent** (chosen.json predates tuning protocols" in text
    assert "stage" not in table.columns  # one stage: no column for it


def test_tuning_seeds_shared_with_the_studys_runs_are_pointed_out(tmp_path):
    _tune_folder(tmp_path)
    for name in ("figures", "tables"):
        (tmp_path / name).mkdir()
    for seeds, said in (([1, 2, 3], True), ([2, 3, 4], False)):
        (tmp_path / "regime.json").write_text(json.dumps({"seeds": seeds, "runs": {}}))
        document = Document()
        tuning_section(document, tmp_path, tmp_path / "figures", tmp_path / "tables")
        text = render_markdown(document, "t")
        assert ("**The tuning runs share seed(s) [1] with the study's runs**" in text) == said


def test_the_curve_uses_the_grid_seeds_and_marks_divergence(tmp_path):
    _tune_folder(tmp_path)
    frame = pd.read_csv(tmp_path / "tune" / "results.csv")
    row = {"method": "full", "preset": "tiny", "values": {"optim.lr": 0.004}, "defaults": {"optim.lr": 0.001}}
    curve = tuning_curve(frame, row, seeds=[0])
    assert list(curve["x"]) == [0.001, 0.002, 0.004, 0.008]
    assert list(curve["score"][:3]) == [5.0, 4.6, 4.4]  # the refinement seed is not mixed into the line
    assert list(curve["diverged"]) == [False, False, False, True]


def test_a_study_without_a_tune_stage_gets_no_section(tmp_path):
    document = Document()
    tuning_section(document, tmp_path, tmp_path, tmp_path)
    assert document.blocks == []


DENSE_KEYS = ["optim.embed_lr", "optim.head_lr", "optim.norm_lr"]


def _score(dense: float, lr: float) -> float:
    """A made-up bowl over the 2-D grid of stage 1, lowest at dense 0.006, lr 0.002."""
    return 4.0 + abs(math.log(dense / 0.006)) / 5 + abs(math.log(lr / 0.002)) / 4


def _shared_dense_folder(study_dir):
    """A shared-dense tune folder: stage 1 full rank over dense lr x lr, stage 2 galore's lr at the
    dense lr stage 1 chose (results.csv with the stage column and the dense keys)."""
    tune = study_dir / "tune"
    tune.mkdir(parents=True)
    rows = []
    for dense in (0.002, 0.006, 0.02):
        for lr in (0.001, 0.002, 0.004):
            rows.append({"method": "full", "preset": "tiny", "stage": 1, "point": f"dense_lr{dense:g}_lr{lr:g}",
                         **{key: dense for key in DENSE_KEYS}, "optim.lr": lr, "seed": 0, "phase": "grid",
                         "state": "done", "score": _score(dense, lr), "run": f"full-tiny-d{dense:g}-lr{lr:g}-s0"})
    for lr, score in ((0.005, 4.6), (0.01, 4.5), (0.02, 4.55)):
        rows.append({"method": "galore", "preset": "tiny", "stage": 2, "point": f"lr{lr:g}",
                     **{key: 0.006 for key in DENSE_KEYS}, "optim.lr": lr, "seed": 0, "phase": "grid",
                     "state": "done", "score": score, "run": f"galore-tiny-lr{lr:g}-dense0.006-s0"})
    pd.DataFrame(rows).to_csv(tune / "results.csv", index=False)
    shared = {key: 0.006 for key in DENSE_KEYS}
    chosen = {"metric": "val_loss", "seeds": [0], "refine_seeds": [], "max_extensions": 0, "protocol": "shared-dense",
              "members": ["full", "galore", "frozen"], "dense_keys": DENSE_KEYS, "shared_dense": {"tiny": shared},
              "cells": [
                  {"method": "full", "preset": "tiny", "stage": 1, "fixed": {}, "values": {**shared, "optim.lr": 0.002},
                   "score": 4.0, "score_std": None, "seeds": [0], "defaults": {"optim.embed_lr": 0.001, "optim.lr": 0.001},
                   "diverged_runs": 0, "failed_runs": 0, "at_edge": {}, "note": ""},
                  {"method": "galore", "preset": "tiny", "stage": 2, "fixed": shared, "values": {"optim.lr": 0.01},
                   "score": 4.5, "score_std": None, "seeds": [0], "defaults": {"optim.lr": 0.01},
                   "diverged_runs": 0, "failed_runs": 0, "at_edge": {}, "note": ""}]}
    (tune / "chosen.json").write_text(json.dumps(chosen))
    return chosen


def test_stage_one_of_the_shared_dense_protocol_is_drawn_once_per_dense_lr(tmp_path):
    from rankscope.report.figures.tuning import tuning_curves

    chosen = _shared_dense_folder(tmp_path)
    frame = pd.read_csv(tmp_path / "tune" / "results.csv")
    full, galore = chosen["cells"]
    curves = tuning_curves(frame, full, [0], DENSE_KEYS)
    assert [dense for dense, _ in curves] == [0.002, 0.006, 0.02]
    for dense, curve in curves:
        assert list(curve["x"]) == [0.001, 0.002, 0.004]
        assert list(curve["score"]) == pytest.approx([_score(dense, lr) for lr in (0.001, 0.002, 0.004)])
    # The 1-D curve holds the other keys at the choice: the chosen dense lr's line only.
    assert list(tuning_curve(frame, full, [0])["score"]) == pytest.approx(list(curves[1][1]["score"]))
    (only, curve), = tuning_curves(frame, galore, [0], DENSE_KEYS)  # stage 2: one line, at the fixed dense lr
    assert only is None and list(curve["score"]) == [4.6, 4.5, 4.55]


def test_the_tuning_section_states_the_shared_dense_protocol_and_each_stage(tmp_path):
    _shared_dense_folder(tmp_path)
    for name in ("figures", "tables"):
        (tmp_path / name).mkdir()
    document = Document()
    tuning_section(document, tmp_path, tmp_path / "figures", tmp_path / "tables")
    text = render_markdown(document, "t")
    table = pd.read_csv(tmp_path / "tables" / "tuning.csv", keep_default_na=False).set_index("method")
    assert table.loc["full", "stage"] == "1: with the dense lr" and table.loc["galore", "stage"] == "2: dense lr fixed"
    assert table.loc["full", "dense lr fixed at"] == "–" and table.loc["galore", "dense lr fixed at"] == "0.006"
    assert table.loc["full", "chosen"] == "dense_lr=0.006, lr=0.002"
    assert table.loc["full", "tried"] == "dense_lr 0.002..0.02 (3); lr 0.001..0.004 (3)"
    assert "Tuning protocol **shared-dense**: stage 1 tuned full rank's block lr jointly" in text
    assert "chosen per scale: tiny 0.006" in text and "for every other method and the control (frozen) and" in text
    assert (tmp_path / "figures" / "tuning_tiny.png").is_file() and "one line per dense lr" in text


@pytest.mark.parametrize("control_score, separates", [(4.1, False), (4.35, True)])
def test_the_tuning_section_says_whether_the_tuning_regime_separates_the_methods(tmp_path, control_score, separates):
    from rankscope.study.tune import tuning_informativeness

    chosen = _shared_dense_folder(tmp_path)
    chosen["controls"] = [{"method": "frozen", "preset": "tiny", "stage": 2, "fixed": chosen["shared_dense"]["tiny"],
                           "values": {}, "score": control_score}]
    chosen["informativeness"] = tuning_informativeness(chosen, 0.2)
    verdict = chosen["informativeness"]["tiny"]
    assert verdict["best_method"] == "full" and verdict["gap"] == pytest.approx(control_score - 4.0)
    assert verdict["verdict"] == ("can separate" if separates else "cannot separate")
    (tmp_path / "tune" / "chosen.json").write_text(json.dumps(chosen))
    for name in ("figures", "tables"):
        (tmp_path / name).mkdir()
    document = Document()
    tuning_section(document, tmp_path, tmp_path / "figures", tmp_path / "tables")
    text = render_markdown(document, "t")
    assert f"control (block matrices at init, dense lr shared) scored {control_score:.4f}" in text
    assert ("the tuning regime can separate the methods." in text) == separates
    assert ("**the tuning regime cannot separate methods by their block matrices**" in text) == (not separates)
    assert "frozen" not in set(pd.read_csv(tmp_path / "tables" / "tuning.csv")["method"])
