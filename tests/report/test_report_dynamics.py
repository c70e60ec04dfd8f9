"""The report's training-dynamics section on a synthetic study folder whose metrics.jsonl files
carry `dynamics` and `spike` entries in the trainer's format (rankscope.train.dynamics)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import yaml

from rankscope.report import build_report, load_study
from rankscope.report.dynamics import read_dynamics, spike_table

# method -> steps at which a spike is logged, and the matrices named as jumped at each
SPIKES = {
    "full": {},
    "lowrank": {37: ["layers.1.mlp.down_proj", "layers.0.mlp.down_proj"], 71: ["layers.1.mlp.down_proj"]},
    "spectron": {},
}


def _write_run(study, method: str, seed: int, spikes: dict, dynamics: bool = True) -> None:
    run = f"{method}-tiny-s{seed}"
    run_dir = study / "runs" / run
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"preset": "tiny"}, "method": {"name": method}, "train": {"seed": seed, "steps": 100}}))
    (run_dir / "summary.json").write_text(json.dumps(
        {"method": method, "preset": "tiny", "seed": seed, "steps": 100, "val_loss": 5.0, "val_ppl": math.exp(5.0)}))
    with open(run_dir / "metrics.jsonl", "w") as log:
        for step in range(1, 101):
            lr = 1e-3 * min(1.0, step / 10)
            record = {"step": step, "loss": 8.0 - 0.03 * step, "lr": lr}
            if dynamics and step % 10 == 0:
                norm = lr * (0.9 if method == "spectron" else 3.0)
                record["dynamics"] = {
                    "trigger": "period", "max_update_norm": norm, "max_update_matrix": "layers.0.self_attn.q_proj",
                    "max_update_lr": lr, "max_update_ratio": norm / 2.0, "median_update_ratio": norm / 4.0,
                    "max_factor_update_norm": None, "groups": {}, "matrices": {},
                }
            if step in spikes:
                record["loss"] *= 1.5
                record["spike"] = {"loss": record["loss"], "median": record["loss"] / 1.5, "ratio": 1.5,
                                   "matrices": [{"matrix": m, "update_norm": 1.0, "jump": 9.0} for m in spikes[step]]}
            log.write(json.dumps(record) + "\n")


@pytest.fixture
def study(tmp_path):
    for method, spikes in SPIKES.items():
        for seed in (0, 1):
            _write_run(tmp_path, method, seed, spikes if seed == 0 else {})
    return tmp_path


def test_spikes_are_read_and_counted_per_method(study):
    loaded = load_study(study)
    updates, spikes = read_dynamics(loaded)
    assert len(updates) == 3 * 2 * 10
    assert sorted(spikes["step"]) == [37, 71]
    table = spike_table(loaded.runs, spikes, "tiny").set_index("method")
    assert table.loc["lowrank", "spikes"] == 2 and table.loc["lowrank", "runs"] == 2
    assert table.loc["lowrank", "spikes per run"] == 1.0
    assert table.loc["lowrank", "first spike steps"] == "37, 71"
    assert table.loc["lowrank", "update jumped most often"] == "mlp.down_proj (3)"
    assert table.loc["full", "spikes"] == 0 and table.loc["full", "first spike steps"] == "–"
    assert list(table.index) == ["full", "lowrank", "spectron"]


def test_report_has_the_dynamics_section(study):
    out = build_report(study)
    text = (out / "report.md").read_text()
    assert "### Training dynamics" in text
    for name in ("dynamics_updates_tiny", "dynamics_spikes_tiny"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 10_000
        assert f"{name}.png" in text
    table = pd.read_csv(out / "tables" / "dynamics_spikes_tiny.csv")
    assert dict(zip(table["method"], table["spikes"])) == {"full": 0, "lowrank": 2, "spectron": 0}


def test_no_section_without_dynamics(tmp_path):
    for method in ("full", "lowrank"):
        _write_run(tmp_path, method, 0, {}, dynamics=False)
    text = (build_report(tmp_path) / "report.md").read_text()
    assert "Training dynamics" not in text
