"""End to end: the quick demo, a study killed mid-way and resumed, and eval on every method."""

import json
import os

import pytest

from rankscope import methods
from rankscope.cli import main
from rankscope.config import build_config
from rankscope.study import evaluate_run, run_study, study_from_dict
from rankscope.train import train

pytestmark = pytest.mark.slow


def test_quick_demo_produces_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "val ppl" in printed
    report = out / "report"
    assert (report / "report.md").is_file() and (report / "report.html").is_file()
    html = (report / "report.html").read_text()
    assert "data:image/png;base64," in html and 'src="http' not in html
    figures = {p.name for p in (report / "figures").glob("*.png")}
    for expected in ("landscape_random_tiny.png", "ccbh_tiny.png", "imbh_tiny.png", "spectral_tiny.png",
                     "similarity_tiny.png", "downstream_tiny.png", "predictor.png"):
        assert expected in figures
    status = json.loads((out / "status.json").read_text())
    assert all(stage["state"] == "done" for run in status.values() for stage in run.values())
    import pandas as pd

    results = pd.read_csv(report / "tables" / "results_tiny.csv")
    assert set(results["method"]) == {"full", "lowrank", "galore", "cola", "loro"}


def _small_study(**extra):
    spec = {
        "grid": {"methods": ["full", "lowrank"], "presets": ["tiny"], "seeds": [0, 1]},
        "base": {"model": {"overrides": {"num_layers": 1}}, "data": {"seq_len": 32, "val_sequences": 8, "probe_sequences": 4},
                 "train": {"steps": 6, "batch_size": 4, "eval_every": 0, "checkpoint_steps": [3, 6]}},
        "analysis": {"probe_size": 4, "directions": 2, "grid_points": 3, "singular_k_max": 1, "singular_ks": [1],
                     "singular_unweighted": False, "metrics": ["landscape", "interpolation", "spectral", "similarity"]},
        "eval": {"tasks": ["rs_word"], "limit": 4},
    }
    spec.update(extra)
    return study_from_dict(spec)


def _mtimes(folder):
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_killed_study_resumes_without_redoing_finished_work(tmp_path, monkeypatch):
    import rankscope.analysis.pipeline as pipeline

    out = tmp_path / "study"
    real = pipeline.analyze_runs
    calls = {"n": 0}

    def killed_on_the_second_group(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # stands for a kill while the seed-1 group is analysed
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "analyze_runs", killed_on_the_second_group)
    with pytest.raises(KeyboardInterrupt):
        run_study(None, out, spec=_small_study())
    runs = out / "runs"
    before_checkpoints = {k: v for k, v in _mtimes(runs).items() if "/checkpoints/" in k}
    before_analysis = {k: v for k, v in _mtimes(runs / "full-tiny-s0" / "analysis" / "items").items()}
    assert before_analysis  # the first group finished its analysis

    monkeypatch.setattr(pipeline, "analyze_runs", real)
    result = run_study(None, out, spec=_small_study())
    assert result["failed"] == [] and (out / "report" / "report.html").is_file()
    after = _mtimes(runs)
    assert all(after[k] == v for k, v in before_checkpoints.items())  # no run retrained
    assert all(after[k] == v for k, v in before_analysis.items())  # finished items kept
    assert (runs / "lowrank-tiny-s1" / "analysis" / "spectral.csv").is_file()


def test_a_failing_run_is_recorded_and_the_study_goes_on(tmp_path):
    spec = _small_study(method_overrides={"lowrank": {"optim": {"lr": 1e6}, "train": {"nonfinite": "stop"}}})
    result = run_study(None, tmp_path / "study", spec=spec, stages=("train", "report"))
    status = json.loads((tmp_path / "study" / "status.json").read_text())
    assert set(result["failed"]) == {"lowrank-tiny-s0", "lowrank-tiny-s1"}
    assert "non-finite" in status["lowrank-tiny-s0"]["train"]["error"]
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
