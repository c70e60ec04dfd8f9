"""`rankscope scaling SPEC.yaml` and `rankscope scaling fit TABLE.csv`: spec validation before any
training, a tiny end-to-end study through the study machinery (with resume), the CLI's outputs
and its one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from scaling_synthetic import COARSE, synthetic

from rankscope.cli import main
from rankscope.errors import ConfigError
from rankscope.scaling.family import FAMILY, family_table, non_embedding_params
from rankscope.scaling.runner import plan_levels, run_scaling, spec_from_dict

TINY_BASE = {
    "data": {"vocab_size": 512, "seq_len": 32, "val_sequences": 16, "probe_sequences": 4},
    "train": {"batch_size": 4, "eval_every": 0, "log_every": 4},
}


# 16 starts: the end-to-end test checks the plumbing; the fit itself is tested in test_scaling_fit.
FEW_STARTS = {"a": [0, 10], "b": [0, 10], "e": [0], "alpha": [0.5, 1], "beta": [0.5, 1]}


def _spec(**changes) -> dict:
    spec = {"name": "t", "methods": ["full", "lowrank"], "sizes": ["w32l2", "w48l2", "w64l2"],
            "tokens": [256, 512, 1024], "base": TINY_BASE, "fit": {"bootstrap": 10, "grid": FEW_STARTS}}
    spec.update(changes)
    return spec


def test_the_family_grows_in_width_and_depth_up_to_the_literature_presets():
    rows = family_table()
    sizes = [r["non_embedding_params"] for r in rows]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(FAMILY)
    assert [r["preset"] for r in rows][-4:] == ["60m", "130m", "350m", "1b"]
    assert all(a["layers"] <= b["layers"] and a["hidden"] < b["hidden"] for a, b in zip(rows, rows[1:]))
    from rankscope.models import get_preset
    from rankscope.models.llama import count_parameters

    config = get_preset("60m")
    assert non_embedding_params(config) == count_parameters(config) - 2 * config.vocab_size * config.hidden_size


def test_budgets_become_steps_per_size():
    levels = plan_levels(spec_from_dict(_spec()))
    assert [level.label for level in levels] == ["tokens-256", "tokens-512", "tokens-1024"]
    assert levels[0].steps == {"w32l2": 2, "w48l2": 2, "w64l2": 2}
    per_param = plan_levels(spec_from_dict(_spec(tokens=[], tokens_per_param=[0.01, 0.02, 0.04])))
    assert per_param[0].label == "tpp-0.01"
    assert per_param[0].steps["w32l2"] == round(0.01 * 26784 / 128)  # w32l2: 26,784 non-embedding params


@pytest.mark.parametrize("changes,message", [
    ({"methods": ["lowrank", "spectron"]}, "methods must include 'full'"),
    ({"methods": ["full", "lowrnk"]}, "unknown method 'lowrnk'"),
    ({"sizes": ["w32l2", "w48l2"]}, r"2 model size\(s\) .* cannot identify"),
    ({"tokens": [256, 512]}, r"2 token budget\(s\) .* cannot identify"),
    ({"tokens_per_param": [1, 2, 3]}, "exactly one of them"),
    ({"tokens": [16, 512, 1024]}, "less than one step"),
    ({"sizes": ["w32l2", "w48l2", "w64"]}, "unknown model preset 'w64' \\(did you mean 'w64l2'"),
    ({"method_overrides": {"lowrank": {"train": {"batch_size": 8}}}}, "sets train.batch_size"),
    ({"params": "trainable"}, "scaling.params: 'trainable' is not one of"),
    ({"fit": {"bootstrap": -1}}, "fit.bootstrap must be >= 0"),
])
def test_bad_specs_are_refused_before_training(changes, message):
    with pytest.raises(ConfigError, match=message):
        plan_levels(spec_from_dict(_spec(**changes)))


def test_a_tiny_scaling_study_end_to_end(tmp_path):
    result = run_scaling(None, tmp_path / "out", spec=spec_from_dict(_spec()))
    out = tmp_path / "out"
    table = pd.read_csv(out / "scaling.csv")
    assert len(table) == 2 * 3 * 3 and result["failed"] == []
    assert set(table["tokens"]) == {256, 512, 1024}
    full, lowrank = (table[table["method"] == m].set_index("size") for m in ("full", "lowrank"))
    assert full.loc["w32l2", "params"].iloc[0] == 26784  # non-embedding count of the dense model
    assert (lowrank["params"] < full["params"]).all()
    assert (lowrank["flops_per_token"] < full["flops_per_token"]).all()
    fits = json.loads((out / "fits.json").read_text())
    assert set(fits) == {"full", "lowrank"}
    for entry in fits.values():
        assert set(entry) == {"E", "A", "alpha", "B", "beta", "ci"}
        assert set(entry["ci"]) == {"E", "A", "alpha", "B", "beta"} and all(len(v) == 2 for v in entry["ci"].values())
    optimal = json.loads((out / "compute_optimal.json").read_text())
    assert optimal["lowrank"]["train_flops_per_token"]["source"] == "measured"
    for name in ("report.md", "report.html", "frontier.csv", "figures/isoflop.png", "figures/loss_vs_compute.png"):
        assert (out / name).is_file(), name
    assert "Dense and low-rank frontiers" in (out / "report.md").read_text()
    # Every budget is an ordinary study folder; a second call trains nothing and fits the same runs.
    assert json.loads((out / "budgets" / "tokens-256" / "status.json").read_text())["full-w32l2-s0"]["train"]["state"] == "done"
    again = run_scaling(None, out, spec=spec_from_dict(_spec()))
    assert again["fits"] == result["fits"]


def test_cli_fit_writes_fits_json(tmp_path, capsys):
    path = tmp_path / "runs.csv"
    synthetic(noise=0.0).assign(extra="ignored").to_csv(path, index=False)
    grid = [arg for key, values in COARSE.items() for arg in ("--grid", f"{key}={','.join(map(str, values))}")]
    assert main(["scaling", "fit", str(path), "--bootstrap", "10", "--out", str(tmp_path / "fit"), *grid]) == 0
    fits = json.loads((tmp_path / "fit" / "fits.json").read_text())
    assert fits["m"]["alpha"] == pytest.approx(0.34, rel=1e-3)
    assert "m: alpha 0.34" in capsys.readouterr().out


@pytest.mark.parametrize("table,message", [
    (synthetic().drop(columns="tokens"), "lacks the column tokens"),
    (synthetic(sizes=np.array([1e7])), "method m: 1 model size"),
])
def test_cli_fit_errors_are_one_line(tmp_path, capsys, table, message):
    path = tmp_path / "runs.csv"
    table.to_csv(path, index=False)
    assert main(["scaling", "fit", str(path), "--out", str(tmp_path / "fit"), "--grid", "a=0,10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "fit" / "fits.json").exists()


def test_cli_usage_errors(tmp_path, capsys):
    assert main(["scaling", "fit"]) == 2
    assert "usage: rankscope scaling fit TABLE.csv" in capsys.readouterr().err
    assert main(["scaling", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_dry_run_plans_every_budget_on_a_cluster_and_writes_nothing(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec()))
    out = tmp_path / "out"
    assert main(["scaling", str(spec), "--out", str(out), "--launcher", "slurm", "--slurm-partition", "gpu",
                 "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for label in ("tokens-256", "tokens-512", "tokens-1024"):
        assert f"budget {label}:" in printed
    assert "gpu" in printed
    assert not out.exists()


@pytest.mark.slow
def test_every_budget_tunes_its_own_lrs_and_the_table_reads_the_chosen_ones(tmp_path):
    # Stage 1 over the dense lr only (full rank's block lr fixed), stage 2 over lowrank's block lr.
    tune = {"protocol": "shared-dense", "dense": {"values": [0.003, 0.03]}, "params": {"optim.lr": {"values": [0.002]}},
            "method_params": {"lowrank": {"optim.lr": {"values": [0.001, 0.004]}}}, "max_extensions": 0}
    sizes = ["w32l2", "w48l2", "w64l2"]
    spec = _spec(sizes=sizes, tune=tune)
    result = run_scaling(None, tmp_path / "out", spec=spec_from_dict(spec))
    assert result["failed"] == []
    table = pd.read_csv(tmp_path / "out" / "scaling.csv")
    assert len(table) == 2 * 3 * 3
    for budget in ("tokens-256", "tokens-512", "tokens-1024"):
        chosen = json.loads((tmp_path / "out" / "budgets" / budget / "tune" / "chosen.json").read_text())
        assert chosen["protocol"] == "shared-dense" and chosen["controls"] == []  # no control in a scaling fit
        assert set(chosen["shared_dense"]) == set(sizes)
        cells = {(c["method"], c["preset"]): c for c in chosen["cells"]}
        assert set(cells) == {(m, s) for m in ("full", "lowrank") for s in sizes}
        for (method, size), cell in cells.items():
            # Each budget's runs train at that budget's choice: the dense lr of stage 1 for both
            # methods, each method's own block lr.
            row = table[(table["budget"] == budget) & (table["method"] == method) & (table["size"] == size)].iloc[0]
            assert row["lr"] == cell["values"]["optim.lr"]
            assert row["embed_lr"] == chosen["shared_dense"][size]["optim.embed_lr"]
            steps = yaml.safe_load((tmp_path / "out" / "budgets" / budget / "runs" / f"{method}-{size}-s0" /
                                    "config.yaml").read_text())["train"]["steps"]
            assert chosen["steps"][f"{method}/{size}"] == steps  # tuned at the budget's own steps
    assert "tuned at every budget and size by that budget's tune stage (protocol shared-dense" in (
        tmp_path / "out" / "report.md").read_text()
