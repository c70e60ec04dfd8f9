"""End to end: the quick demo, a failing run recorded while the others go on, and eval on every method.

(A study stopped mid-way and resumed: test_workers.py and test_launchers.py.)"""

import json

import pytest
from study_helpers import small_study

from rankscope import methods
from rankscope.cli import main
from rankscope.config import build_config
from rankscope.study import LaunchOptions, evaluate_run, run_study
from rankscope.train import train

pytestmark = pytest.mark.slow


def test_quick_demo_produces_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "val ppl" in printed
    # The terminal's regime line: block lrs per method, the control's none, the shared dense lrs.
    flat = " ".join(printed.split())  # the terminal wraps long lines
    assert "block lr (" in flat and "frozen – (frozen)" in flat
    assert "for every run embeddings lr 0.03" in flat
    report = out / "report"
    assert (report / "report.md").is_file() and (report / "report.html").is_file()
    html = (report / "report.html").read_text()
    assert "data:image/png;base64," in html and 'src="http' not in html
    figures = {p.name for p in (report / "figures").glob("*.png")}
    for expected in ("landscape_random_tiny.png", "ccbh_tiny.png", "imbh_tiny.png", "imbh_to_full_tiny.png", "spectral_tiny.png",
                     "similarity_tiny.png", "downstream_tiny.png", "predictor.png"):
        assert expected in figures
    status = json.loads((out / "status.json").read_text())
    assert all(stage["state"] == "done" for run in status.values() for stage in run.values())
    import pandas as pd

    results = pd.read_csv(report / "tables" / "results_tiny.csv")
    assert set(results["method"]) == {"full", "lowrank", "galore", "cola", "loro", "frozen"}
    assert results.loc[results["method"] == "frozen", "control"].all()
    # The regime check comes before any ranking, and its verdict is the one the numbers give.
    verdict = pd.read_csv(report / "tables" / "informativeness.csv").iloc[0]
    assert verdict["control_method"] == "frozen" and verdict["margin"] == 0.2
    means = results.set_index("method")["val_loss_mean"]
    best = means.drop("frozen").idxmin()
    assert verdict["best_method"] == best
    assert verdict["gap_control_minus_best"] == pytest.approx(means["frozen"] - means[best])
    separates = means["frozen"] - means[best] > 0.2
    assert verdict["verdict"] == ("can separate" if separates else "cannot separate")
    text = (report / "report.md").read_text()
    phrase = "This regime can separate methods" if separates else "This regime cannot tell apart methods"
    assert text.index(phrase) < text.index("### Ranking")
    # Two seeds: one full-rank seed pair, every low-rank method read against it, both pairings.
    distance = pd.read_csv(report / "tables" / "distance_to_full_tiny.csv")
    cka = distance[distance["metric"] == "cka_last_layer"]
    assert cka.loc[cka["method"] == "full", "baseline_pairs"].tolist() == [1]
    assert set(zip(cka["method"], cka["pairing"])) >= {(m, p) for m in ("lowrank", "galore", "cola", "loro", "frozen")
                                                        for p in ("same-seed", "cross-seed")}
    assert cka["reading"].str.contains("seed baseline").sum() == 10


def test_a_failing_run_is_recorded_and_the_study_goes_on(tmp_path):
    spec = small_study(method_overrides={"lowrank": {"optim": {"lr": 1e6}, "train": {"nonfinite": "stop"}}})
    result = run_study(None, tmp_path / "study", spec=spec, stages=("train", "report"), launch=LaunchOptions(workers=2))
    status = json.loads((tmp_path / "study" / "status.json").read_text())
    assert set(result["failed"]) == {"lowrank-tiny-s0", "lowrank-tiny-s1"}
    assert "non-finite" in status["lowrank-tiny-s0"]["train"]["error"]
    log = (tmp_path / "study" / status["lowrank-tiny-s0"]["train"]["log"]).read_text()
    assert "Traceback" in log and "NonFiniteLossError" in log  # the whole story is in the run's log
    assert status["full-tiny-s0"]["train"]["state"] == "done"
    report = (tmp_path / "study" / "report" / "report.md").read_text()
    assert "lowrank-tiny-s0" in report and "non-finite" in report


@pytest.mark.parametrize("method", methods.names())
def test_eval_works_on_every_method(method, tmp_path, tiny_overrides):
    cfg = build_config({}, tiny_overrides + ["model.overrides={num_layers: 1}", "train.steps=2", f"method.name={method}"])
    run = tmp_path / method
    train(cfg, run)
    result = evaluate_run(run, None, ["rs_word", "rs_cloze"], limit=6, batch_size=8, device="cpu")
    assert set(result["tasks"]) == {"rs_word", "rs_cloze"}
    for row in result["tasks"].values():
        assert 0.0 <= row["acc"] <= 1.0
    assert json.loads((run / "eval" / "step_000002.json").read_text())["mean_acc"] == pytest.approx(result["mean_acc"])
