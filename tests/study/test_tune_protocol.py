"""The shared-dense tuning protocol: stage 1 tunes full rank's block lr jointly with one lr for the
embeddings, head and norms; stage 2 fixes that dense lr for every method and control and tunes only
each method's own lr. End to end on a tiny study, and its planning and bad input without training."""

import json

import pandas as pd
import pytest
import yaml
from study_helpers import small_study_dict

from rankscope.errors import ConfigError
from rankscope.study import LaunchOptions, run_study, study_from_dict
from rankscope.study.spec import DENSE_KEYS
from rankscope.study.tune import plan_tuning


def _spec(tune, methods=("full", "lowrank"), controls=("frozen",), **extra):
    return study_from_dict(small_study_dict(methods=methods, seeds=(0,), tune=tune, controls=controls, **extra))


def test_stage_one_is_full_rank_with_a_tied_dense_axis_and_stage_two_the_other_methods_only():
    cells = plan_tuning(_spec({"params": {"optim.lr": {"values": [0.001, 0.002]}}, "dense": {"values": [0.003, 0.01]}}))
    assert [(c.method, c.stage) for c in cells] == [("full", 1), ("lowrank", 2)]  # no cell for the control
    full, lowrank = cells
    dense = full.axes[0]
    assert dense.keys == DENSE_KEYS and dense.values == (0.003, 0.01) and dense.label == "dense_lr"
    assert full.values((0.01, 0.002)) == {"optim.embed_lr": 0.01, "optim.head_lr": 0.01, "optim.norm_lr": 0.01,
                                          "optim.lr": 0.002}
    assert [a.key for a in lowrank.axes] == ["optim.lr"]
    fixed = lowrank.with_fixed({key: 0.01 for key in DENSE_KEYS})
    assert fixed.run_name((0.002,), 0) == "lowrank-tiny-lr0.002-dense0.01-s0"
    assert fixed.config_tree((0.002,), 0)["optim"] == {"lr": 0.002, "embed_lr": 0.01, "head_lr": 0.01, "norm_lr": 0.01}


def test_the_independent_protocol_tunes_every_member_on_its_own_lr_control_included():
    cells = plan_tuning(_spec({"protocol": "independent", "params": {"optim.lr": {"values": [0.001, 0.002]}}}))
    assert [(c.method, c.stage, [a.key for a in c.axes]) for c in cells] == [
        ("full", 0, ["optim.lr"]), ("lowrank", 0, ["optim.lr"]), ("frozen", 0, ["optim.lr"])]


@pytest.mark.parametrize("tune, extra, message", [
    ({"protocol": "shared"}, {}, r"tune.protocol 'shared' is unknown \(did you mean 'shared-dense'\?\); use one of shared-dense, independent"),
    ({"methods": ["lowrank"]}, {}, "shared-dense tunes the dense lrs with 'full', which tune.methods leaves out"),
    ({}, {"base": {"optim": {"embed_lr": 0.01}}}, "optim.embed_lr is set by the study or its tune grid"),
    ({"dense_keys": ["optim.lr"]}, {}, r"tune.dense_keys \['optim.lr'\] must list some of"),
    ({"dense": {"values": [0.01], "multipliers": [2]}}, {}, "give exactly one of values"),
])
def test_a_bad_protocol_block_is_one_clear_error(tune, extra, message):
    block = {"params": {"optim.lr": {"values": [0.001, 0.002]}}, **tune}
    spec_dict = small_study_dict(methods=("full", "lowrank"), seeds=(0,), tune=block, controls=("frozen",))
    if "base" in extra:
        spec_dict["base"]["optim"] = extra["base"]["optim"]
    with pytest.raises(ConfigError, match=message):
        plan_tuning(study_from_dict(spec_dict))


@pytest.mark.slow
def test_stage_two_and_the_train_stage_use_stage_ones_dense_lr_for_every_method_and_the_control(tmp_path):
    tune = {"params": {"optim.lr": {"values": [0.0005, 0.002]}}, "dense": {"values": [0.0005, 0.01]}, "steps": 5,
            "max_extensions": 0}
    spec_dict = small_study_dict(methods=("full", "lowrank"), seeds=(0,), tune=tune, controls=("frozen",))
    out = tmp_path / "study"
    run_study(None, out, spec=study_from_dict(spec_dict), stages=("tune", "train"), launch=LaunchOptions(workers=2))

    chosen = json.loads((out / "tune" / "chosen.json").read_text())
    assert chosen["protocol"] == "shared-dense"
    rows = {row["method"]: row for row in chosen["cells"]}
    assert set(rows) == {"full", "lowrank"} and rows["full"]["stage"] == 1 and rows["lowrank"]["stage"] == 2
    dense = rows["full"]["values"]["optim.embed_lr"]
    shared = {key: dense for key in DENSE_KEYS}
    assert chosen["shared_dense"] == {"tiny": shared} and rows["lowrank"]["fixed"] == shared
    assert rows["full"]["points"] == 4  # the 2 x 2 grid of stage 1

    # Every stage-2 tuning run trained with stage 1's dense lr; only its own lr varied.
    stage2 = sorted(p for p in (out / "tune" / "runs").iterdir() if p.name.startswith("lowrank-"))
    assert [p.name for p in stage2] == [f"lowrank-tiny-lr{lr}-dense{dense:.4g}-s0" for lr in ("0.0005", "0.002")]
    for run in stage2:
        optim = yaml.safe_load((run / "config.yaml").read_text())["optim"]
        assert {key: optim[key.split(".")[1]] for key in DENSE_KEYS} == shared

    # The control trained at stage 1's dense lr with the tuning seeds; chosen.json judges the regime.
    control = sorted(p.name for p in (out / "tune" / "runs").iterdir() if p.name.startswith("frozen-"))
    assert control == [f"frozen-tiny-dense{dense:.4g}-s0"]
    optim = yaml.safe_load((out / "tune" / "runs" / control[0] / "config.yaml").read_text())["optim"]
    assert {key: optim[key.split(".")[1]] for key in DENSE_KEYS} == shared
    [row] = chosen["controls"]
    assert row["method"] == "frozen" and row["fixed"] == shared and row["values"] == {}
    best = min(rows.values(), key=lambda r: r["score"])
    verdict = chosen["informativeness"]["tiny"]
    assert verdict["control"] == "frozen" and verdict["best_method"] == best["method"] and verdict["margin"] == 0.2
    assert verdict["gap"] == pytest.approx(row["score"] - best["score"])
    assert verdict["verdict"] == ("can separate" if verdict["gap"] > 0.2 else "cannot separate")
    assert "frozen" not in {r["method"] for r in chosen["cells"]}  # a reference, never a tuned member
    table = pd.read_csv(out / "tune" / "results.csv")
    assert table.loc[table["method"] == "frozen", "run"].tolist() == control

    # The train stage: the dense lrs for every method and the control, each method's own choice.
    configs = {m: yaml.safe_load((out / "runs" / f"{m}-tiny-s0" / "config.yaml").read_text())["optim"]
               for m in ("full", "lowrank", "frozen")}
    for member, optim in configs.items():
        assert (optim["embed_lr"], optim["head_lr"], optim["norm_lr"]) == (dense, dense, dense), member
    assert configs["full"]["lr"] == rows["full"]["values"]["optim.lr"]
    assert configs["lowrank"]["lr"] == rows["lowrank"]["values"]["optim.lr"]
    regime = json.loads((out / "regime.json").read_text())
    assert regime["tune_protocol"] == "shared-dense" and regime["shared_dense"] == {"tiny": shared}
    assert regime["controls"] == ["frozen"] and regime["runs"]["frozen-tiny-s0"]["control"]
    for run in ("full-tiny-s0", "lowrank-tiny-s0", "frozen-tiny-s0"):
        entry = regime["runs"][run]
        assert entry["role_sources"] == {"embed": "tuned in this study", "head": "tuned in this study",
                                         "norm": "tuned in this study"}
        assert entry["roles"]["embed"]["lr"] == dense
    summary = json.loads((out / "runs" / "lowrank-tiny-s0" / "summary.json").read_text())
    assert {g["name"]: g["lr"] for g in summary["param_groups"]}["other_embed"] == dense


@pytest.mark.parametrize("in_shipped_regime", [True, False])
def test_the_shipped_dense_lrs_count_as_tuned_only_in_their_regime_for_methods_and_control_alike(tmp_path,
                                                                                                in_shipped_regime):
    from rankscope.demo import demo_study_file
    from rankscope.study import load_study, plan_runs
    from rankscope.study.regime_record import OTHER_REGIME, write_regime

    # The demo is the regime tiny was tuned in; the small test study (6 steps) is another one.
    spec = load_study(demo_study_file(quick=False)) if in_shipped_regime else _spec({})
    planned = plan_runs(spec)
    runs = json.loads(write_regime(tmp_path, planned, spec).read_text())["runs"]
    expected = "tuned here" if in_shipped_regime else OTHER_REGIME
    assert {m["method"] for m in runs.values()} >= {"full", "lowrank", "frozen"}
    for name, entry in runs.items():
        assert entry["role_sources"] == {"embed": expected, "head": expected, "norm": expected}, name
