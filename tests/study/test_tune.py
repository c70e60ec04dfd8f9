"""The tune stage: its grids, edge extension, divergence, refinement and choice (with made-up
results, no training), then end to end: the choice reaches the train stage, a run's own lr wins,
and an interrupted tuning resumes without redoing finished runs."""

import json
import math
import os
import signal

import pytest
import yaml
from study_helpers import last_logged_step, read_outcome, small_study_dict, start_driver, wait_for, write_study

from rankscope.errors import ConfigError
from rankscope.study import LaunchOptions, plan_runs, run_study, study_from_dict
from rankscope.study.tune import choose, extend, plan_tuning, read_results, tune_jobs


def _spec(tune, methods=("full", "lowrank"), **extra):
    """The one-stage mechanics (grids, edges, choice) under the independent protocol; the
    shared-dense protocol's two stages have tests of their own (test_tune_protocol.py)."""
    tune = {"protocol": "independent", **tune}
    return study_from_dict(small_study_dict(methods=methods, seeds=(0,), tune=tune, **extra))


def _cell(spec, method="full"):
    return next(c for c in plan_tuning(spec) if c.method == method)


def _results(cell, scores, seed=0):
    """Result files as the tuning runs write them: {point value: score, or 'diverged'}."""
    out = {}
    for value, score in scores.items():
        name = cell.run_name((value,), seed)
        if score == "diverged":
            out[name] = {"diverged": True, "score": None}
        else:
            out[name] = {"diverged": False, "score": score, "val_loss": score}
    return out


def test_multipliers_multiply_the_default_or_the_literature_value(monkeypatch):
    from rankscope.methods import tuned

    # Without shipped tuned defaults "default" is the literature's value.
    monkeypatch.setattr(tuned, "tuned_table", lambda: {})
    spec = _spec({"params": {"optim.lr": {"multipliers": [0.5, 1, 2]}},
                  "method_params": {"lowrank": {"optim.lr": {"values": [0.01, 0.003]}}}})
    full, lowrank = _cell(spec, "full"), _cell(spec, "lowrank")
    assert full.axes[0].values == (0.0005, 0.001, 0.002) and full.axes[0].default == 0.001
    assert lowrank.axes[0].values == (0.003, 0.01)  # sorted, absolute
    assert sorted(full.points) == [(0.0005,), (0.001,), (0.002,)]
    # Where rankscope ships a tuned default, "default" multiplies it and "literature" the paper's value.
    monkeypatch.setattr(tuned, "tuned_table", lambda: {"tiny": {"full": {"lr": 0.004}}})
    around = {name: _cell(_spec({"params": {"optim.lr": {"multipliers": [0.5, 1], "around": name}}}), "full").axes[0]
              for name in ("default", "literature")}
    assert around["default"].values == (0.002, 0.004) and around["default"].default == 0.004
    assert around["literature"].values == (0.0005, 0.001)


def test_a_result_is_read_only_for_the_tuning_run_that_wrote_it(tmp_path):
    """A result file left by a run whose definition has changed since (other steps, other run
    settings) is not a score of the new run: it is not read, and the new run trains again."""
    grid = {"params": {"optim.lr": {"values": [0.001, 0.002]}}}
    old_spec, new_spec = _spec({**grid, "steps": 4}), _spec({**grid, "steps": 6})
    old_jobs = tune_jobs([_cell(old_spec)], tmp_path, old_spec)
    new_jobs = tune_jobs([_cell(new_spec)], tmp_path, new_spec)
    assert [j.name for j in old_jobs] == [j.name for j in new_jobs]  # same run names, same files
    for job in old_jobs:
        (tmp_path / "results").mkdir(exist_ok=True)
        with open(job.result_file, "w") as f:
            json.dump({"diverged": False, "score": 4.0, "fingerprint": job.fingerprint()}, f)
    assert set(read_results(old_jobs)) == {j.name for j in old_jobs}
    assert read_results(new_jobs) == {} and not any(j.finished_on_disk() for j in new_jobs)


def test_a_best_value_on_an_edge_grows_the_grid_by_the_grid_ratio_until_the_bound():
    spec = _spec({"params": {"optim.lr": {"values": [0.001, 0.002, 0.004]}}, "max_extensions": 2})
    cell = _cell(spec)
    # Interior best: nothing to grow.
    assert not extend(cell, _results(cell, {0.001: 5.0, 0.002: 4.0, 0.004: 4.5}), spec)
    # Best at the high edge: one more value, x2 (the ratio of the two outermost values).
    results = _results(cell, {0.001: 5.0, 0.002: 4.5, 0.004: 4.0})
    assert extend(cell, results, spec)
    assert (0.008,) in cell.points and cell.points[(0.008,)] == "extension"
    results.update(_results(cell, {0.008: 3.9}))
    assert extend(cell, results, spec) and (0.016,) in cell.points
    results.update(_results(cell, {0.016: 3.8}))
    assert not extend(cell, results, spec)  # max_extensions (2) reached: flagged, not grown
    chosen = choose([cell], results, spec, out=spec_dir_placeholder())
    row = chosen["cells"][0]
    assert row["values"] == {"optim.lr": 0.016}
    assert row["at_edge"] == {"optim.lr": {"side": "high", "reason": "tune.max_extensions (2) reached"}}


def test_the_low_edge_grows_downwards_and_bounds_and_linear_grids_are_kept():
    spec = _spec({"params": {"optim.lr": {"values": [0.001, 0.002, 0.004], "min": 0.0006}}})
    cell = _cell(spec)
    results = _results(cell, {0.001: 4.0, 0.002: 4.5, 0.004: 5.0})
    assert not extend(cell, results, spec)  # 0.0005 would be below min
    assert cell.blocked == {(0, "low"): "optim.lr min 0.0006"}
    assert choose([cell], results, spec, out=spec_dir_placeholder())["cells"][0]["at_edge"]["optim.lr"]["side"] == "low"

    spec = _spec({"params": {"optim.warmup_ratio": {"values": [0.1, 0.3], "scale": "linear"}}})
    cell = _cell(spec)
    results = {cell.run_name((0.1,), 0): {"score": 5.0}, cell.run_name((0.3,), 0): {"score": 4.0}}
    assert extend(cell, results, spec) and (0.5,) in cell.points  # 0.3 + (0.3 - 0.1)
    results[cell.run_name((0.5,), 0)] = {"score": 3.0}
    assert extend(cell, results, spec) and (0.7,) in cell.points
    results[cell.run_name((0.7,), 0)] = {"score": 2.0}
    assert not extend(cell, results, spec)  # 0.9 is a valid ratio but the default max_extensions is 2
    results[cell.run_name((0.7,), 0)] = {"score": 6.0}
    assert not extend(cell, results, spec)


def test_a_diverged_run_scores_worst_and_a_failed_one_leaves_its_point_unscored():
    spec = _spec({"params": {"optim.lr": {"values": [0.001, 0.002, 0.004]}}})
    cell = _cell(spec)
    # The highest lr diverged: the best finite point is interior, nothing grows.
    results = _results(cell, {0.001: 5.0, 0.002: 4.5, 0.004: "diverged"})
    assert not extend(cell, results, spec)
    row = choose([cell], results, spec, out=spec_dir_placeholder())["cells"][0]
    assert row["values"] == {"optim.lr": 0.002} and row["diverged_runs"] == 1 and row["at_edge"] == {}
    # Everything diverged: nothing is chosen, and the train stage keeps the defaults.
    results = _results(cell, {v: "diverged" for v in (0.001, 0.002, 0.004)})
    row = choose([cell], results, spec, out=spec_dir_placeholder())["cells"][0]
    assert row["values"] is None and "diverged" in row["note"]


def test_the_choice_is_the_best_mean_over_all_seeds_of_the_refined_points():
    spec = _spec({"params": {"optim.lr": {"values": [0.001, 0.002, 0.004]}}, "refine": {"seeds": [1], "top": 2}})
    cell = _cell(spec)
    results = _results(cell, {0.001: 4.0, 0.002: 4.1, 0.004: 4.2})  # seed 0: 0.001 best...
    cell.refined = [(0.001,), (0.002,)]
    results.update(_results(cell, {0.001: 4.6, 0.002: 4.2}, seed=1))  # ...but not over both seeds
    row = choose([cell], results, spec, out=spec_dir_placeholder())["cells"][0]
    assert row["values"] == {"optim.lr": 0.002} and row["seeds"] == [0, 1]
    assert row["score"] == pytest.approx(4.15) and row["score_std"] == pytest.approx(math.sqrt(0.005))


def test_a_choice_the_refinement_seeds_moved_onto_an_edge_is_flagged_with_why_it_was_not_grown():
    spec = _spec({"params": {"optim.lr": {"values": [0.001, 0.002, 0.004]}}, "refine": {"seeds": [1], "top": 2}})
    cell = _cell(spec)
    results = _results(cell, {0.001: 4.1, 0.002: 4.0, 0.004: 4.5})  # seed 0: interior best, nothing grows
    assert not extend(cell, results, spec)
    cell.refined = [(0.002,), (0.001,)]
    results.update(_results(cell, {0.001: 4.0, 0.002: 4.3}, seed=1))  # both seeds: the low edge wins
    row = choose([cell], results, spec, out=spec_dir_placeholder())["cells"][0]
    assert row["values"] == {"optim.lr": 0.001}
    assert row["at_edge"] == {"optim.lr": {"side": "low", "reason": (
        "not extended: the grid seeds' best point (lr0.002) is not on this edge; the refinement seeds moved the "
        "choice here")}}


def test_other_hyper_parameters_and_method_knobs_tune_the_same_way():
    spec = _spec({"params": {"optim.lr": {"values": [0.001, 0.002]}, "optim.warmup_ratio": {"values": [0.0, 0.2],
                                                                                              "scale": "linear"}},
                  "method_params": {"galore": {"method.scale": {"multipliers": [0.5, 1, 2]}, "optim.warmup_ratio": None}}},
                 methods=("full", "galore"))
    full, galore = _cell(spec, "full"), _cell(spec, "galore")
    assert [a.key for a in full.axes] == ["optim.lr", "optim.warmup_ratio"] and len(full.points) == 4
    assert [a.key for a in galore.axes] == ["method.scale", "optim.lr"]
    assert galore.axes[0].values == (0.125, 0.25, 0.5)  # GaLore's scale 0.25 x {1/2, 1, 2}
    point = (0.5, 0.002)
    assert galore.config_tree(point, 3)["method"]["scale"] == 0.5 and galore.label(point) == "scale0.5_lr0.002"
    # Only the line through the best point decides an edge: here scale is on its high edge.
    results = {galore.run_name(p, 0): {"score": 4.0 - p[0] - p[1]} for p in galore.points}
    assert extend(galore, results, spec) and (1.0, 0.002) in galore.points and (0.5, 0.004) in galore.points
    # Now the best is (0.25, 0.002): on the line through it lr is still on its high edge (0.004 was
    # tried only with scale 0.5), and scale is interior.
    results = {galore.run_name(p, 0): {"score": 1.0 if p == (0.25, 0.002) else 2.0} for p in galore.points}
    assert extend(galore, results, spec)
    assert (0.25, 0.004) in galore.points and len(galore.points) == 9


def test_a_runs_own_setting_wins_over_the_choice_and_the_lr_source_says_where_it_came_from(monkeypatch):
    spec = study_from_dict(small_study_dict(methods=("full", "lowrank"), seeds=(0,),
                                            method_overrides={"lowrank": {"optim": {"lr": 0.0005}}}))
    chosen = {("full", "tiny"): {"optim.lr": 0.004, "optim.warmup_ratio": 0.2},
              ("lowrank", "tiny"): {"optim.lr": 0.01, "optim.warmup_ratio": 0.3}}
    runs = {run.method: run for run in plan_runs(spec, chosen)}
    assert runs["full"].config.optim.lr == 0.004 and runs["full"].lr_source == "tuned in this study"
    assert runs["lowrank"].config.optim.lr == 0.0005 and runs["lowrank"].lr_source == "run"
    assert runs["lowrank"].config.optim.warmup_ratio == 0.3  # what it does not set itself, it takes
    assert runs["lowrank"].tuned == {"optim.warmup_ratio": 0.3}
    # Untuned by the study: the shipped tiny default ("tuned here"), or the literature's where none is shipped.
    assert {run.lr_source for run in plan_runs(spec)} == {"tuned here", "run"}
    monkeypatch.setattr("rankscope.methods.tuned.tuned_table", lambda: {})
    assert {run.lr_source for run in plan_runs(spec)} == {"literature", "run"}


@pytest.mark.parametrize("tune, message", [
    ({"params": {"optim.lr": {"values": [0.001]}}, "metric": "val_acc"}, "tune.metric 'val_acc' is unknown"),
    ({"params": {"optim.lr": {"values": [0.001], "multipliers": [1]}}}, "exactly one of values"),
    ({"params": {"method.scale": {"values": [0.25]}}}, "unknown config key 'method.scale'"),
    ({"params": {"optim.lr": {"values": [-0.001, 0.001]}}}, "must stay positive"),
    ({"params": {"optim.lr": {"values": [0.001]}}, "seeds": [0], "refine": {"seeds": [0]}}, "must be new seeds"),
    ({"params": {"optim.lr": {"values": [0.001]}}, "methods": ["galore"]}, "not in grid.methods"),
    ({"params": {"optim.lr": {"vals": [0.001]}}}, "unknown config key 'tune.params.optim.lr.vals'"),
])
def test_a_bad_tune_block_is_one_clear_error(tune, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_tuning(_spec(tune))


def spec_dir_placeholder():
    """`choose` reads job outcomes only for runs without a result; these tests have none."""
    from pathlib import Path

    return Path("/nonexistent-study-dir")


# ---------------------------------------------------------------------------------------------
# end to end (training)


@pytest.mark.slow
def test_the_chosen_lr_reaches_the_train_stage_and_a_runs_own_lr_wins(tmp_path):
    tune = {"protocol": "independent", "params": {"optim.lr": {"values": [0.0001, 0.0002]}}, "steps": 4, "max_extensions": 1,
            "method_params": {"cola": {"optim.lr": {"values": [0.0001, 0.0002, 10000.0]}}}}
    spec_dict = small_study_dict(methods=("full", "lowrank", "cola"), seeds=(0,), tune=tune,
                                 method_overrides={"lowrank": {"optim": {"lr": 0.0005}}})
    # Dense lrs on the grid's scale (tiny's shipped 0.03 would dominate 4 steps): the block lr decides.
    spec_dict["base"]["optim"] = {f"{role}_lr": 0.0002 for role in ("embed", "head", "norm")}
    out = tmp_path / "study"
    run_study(None, out, spec=study_from_dict(spec_dict), stages=("tune", "train"), launch=LaunchOptions(workers=2))

    chosen = json.loads((out / "tune" / "chosen.json").read_text())
    rows = {row["method"]: row for row in chosen["cells"]}
    assert set(rows) == {"full", "cola"}  # lowrank sets optim.lr itself: nothing to tune
    # Short runs favour the larger lr: the best sat on the high edge and the grid grew once.
    assert rows["full"]["values"] == {"optim.lr": 0.0004} and rows["full"]["points"] == 3
    assert rows["full"]["at_edge"]["optim.lr"]["reason"] == "tune.max_extensions (1) reached"
    # lr 1e4 diverges: the worst score, recorded, and the stage went on.
    assert rows["cola"]["values"] == {"optim.lr": 0.0002} and rows["cola"]["diverged_runs"] == 1
    import pandas as pd

    table = pd.read_csv(out / "tune" / "results.csv")
    assert set(table["state"]) == {"done", "diverged"} and len(table) == 6
    assert table.loc[table["run"] == "full-tiny-lr0.0004-s0", "phase"].item() == "extension"
    assert not (out / "tune" / "runs" / "full-tiny-lr0.0004-s0" / "checkpoints").exists()

    configs = {m: yaml.safe_load((out / "runs" / f"{m}-tiny-s0" / "config.yaml").read_text()) for m in rows | {"lowrank": 0}}
    assert configs["full"]["optim"]["lr"] == 0.0004
    assert configs["cola"]["optim"]["lr"] == 0.0002
    assert configs["lowrank"]["optim"]["lr"] == 0.0005
    regime = json.loads((out / "regime.json").read_text())["runs"]
    assert regime["full-tiny-s0"]["lr_source"] == "tuned in this study" and regime["full-tiny-s0"]["lr"] == 0.0004
    assert regime["lowrank-tiny-s0"]["lr_source"] == "run" and regime["lowrank-tiny-s0"]["lr"] == 0.0005

    # Training against the results of another tune: block (or none) is refused before any work.
    spec_dict["tune"]["params"]["optim.lr"]["values"] = [0.0001, 0.0003]
    with pytest.raises(ConfigError, match="another tune: block"):
        run_study(None, out, spec=study_from_dict(spec_dict), stages=("train",))
    with pytest.raises(ConfigError, match="run the tune stage first"):
        run_study(None, tmp_path / "fresh", spec=study_from_dict(spec_dict), stages=("train",))


@pytest.mark.slow
def test_an_interrupted_tuning_resumes_without_redoing_finished_runs(tmp_path):
    tune = {"protocol": "independent", "params": {"optim.lr": {"values": [0.0005, 0.001]}}, "max_extensions": 0,
            "keep_checkpoints": True}
    spec_dict = small_study_dict(methods=("full",), seeds=(0,), steps=40, checkpoint_steps=(), slower=True, tune=tune)
    out = tmp_path / "study"
    driver = start_driver([str(write_study(tmp_path / "s.yaml", spec_dict)), "--out", str(out), "--stage", "tune",
                           "--workers", "1"])
    second = out / "tune" / "runs" / "full-tiny-lr0.001-s0"
    try:
        wait_for(lambda: last_logged_step(second) >= 3 or driver.poll() is not None, 300, "the second tuning run to train")
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C: the running tuning run checkpoints its step
        output, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, output[-2000:]
    first = read_outcome(out, "tune", "full-tiny-lr0.0005-s0")
    stopped = read_outcome(out, "tune", "full-tiny-lr0.001-s0")
    assert first["state"] == "done" and stopped["state"] == "preempted"
    assert not (out / "tune" / "chosen.json").exists()

    run_study(None, out, spec=study_from_dict(spec_dict), stages=("tune",), launch=LaunchOptions(workers=1))
    assert read_outcome(out, "tune", "full-tiny-lr0.0005-s0")["started"] == first["started"]  # not redone
    assert json.loads((second / "summary.json").read_text())["resumed_from"] == stopped["step"]
    chosen = json.loads((out / "tune" / "chosen.json").read_text())
    assert chosen["cells"][0]["values"]["optim.lr"] in (0.0005, 0.001) and chosen["cells"][0]["points"] == 2
