"""The report's tuning section and figure, from a made-up tune folder (no training)."""

import json

import pandas as pd

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
