"""Bad study files fail with a clear message before anything is trained."""

import pytest

from rankscope.errors import ConfigError, RankscopeError
from rankscope.study import load_study, plan_runs, run_study, study_from_dict


def _spec(**grid):
    base = {"grid": {"methods": ["full", "lowrank"], "presets": ["tiny"], "seeds": [0]}}
    base["grid"].update(grid)
    base["base"] = {"train": {"steps": 10}}
    return base


def test_the_grid_expands_to_one_run_per_cell_and_the_control_trains_by_default():
    runs = plan_runs(study_from_dict(_spec(seeds=[0, 1])))
    assert [r.name for r in runs] == ["full-tiny-s0", "lowrank-tiny-s0", "frozen-tiny-s0",
                                      "full-tiny-s1", "lowrank-tiny-s1", "frozen-tiny-s1"]
    assert runs[1].config.method.name == "lowrank" and runs[4].config.train.seed == 1
    assert runs[2].config.method.name == "frozen"
    spec = _spec(seeds=[0])
    spec["controls"] = []
    assert [r.name for r in plan_runs(study_from_dict(spec))] == ["full-tiny-s0", "lowrank-tiny-s0"]


@pytest.mark.parametrize("controls, message", [
    (["frozn"], "controls names unknown control 'frozn'.*did you mean 'frozen'"),
    (["galore"], "controls names 'galore', which is a method, not a control; list it under grid.methods"),
    (["frozen", "frozen"], "controls lists a control twice"),
])
def test_a_bad_controls_list_is_one_clear_error(controls, message):
    spec = _spec()
    spec["controls"] = controls
    with pytest.raises(ConfigError, match=message):
        plan_runs(study_from_dict(spec))


def test_a_negative_informative_margin_is_refused():
    spec = _spec()
    spec["report"] = {"informative_margin": -0.1}
    with pytest.raises(ConfigError, match="report.informative_margin = -0.1 must be >= 0"):
        plan_runs(study_from_dict(spec))


def test_unknown_method_is_named():
    with pytest.raises(RankscopeError, match="unknown method 'galor'.*did you mean 'galore'"):
        plan_runs(study_from_dict(_spec(methods=["full", "galor"])))


def test_methods_all_is_every_registered_method_and_no_control():
    from helpers import throwaway_method  # tests/ is on sys.path
    from rankscope import methods

    spec = study_from_dict(_spec(methods="all"))
    assert spec.grid.methods == methods.method_names() and "frozen" not in spec.grid.methods
    assert study_from_dict(_spec(methods=["all"])).grid.methods == methods.method_names()
    with throwaway_method():  # a method registered later is in every `methods: all` study
        assert study_from_dict(_spec(methods="all")).grid.methods[-1] == "throwaway"
    with pytest.raises(ConfigError, match="write `methods: all` alone"):
        study_from_dict(_spec(methods=["all", "galore"]))


@pytest.mark.parametrize("name", ["demo.yaml", "tune-tiny.yaml", "tune-20m.yaml"])
def test_a_new_method_without_a_tuned_entry_keeps_the_shipped_studies_valid(name):
    """A method added with its file and registry line only: the tuning studies (`methods: all`) plan
    it on its literature lr, and the demo, which lists its methods, does not train it."""
    from helpers import throwaway_method  # tests/ is on sys.path
    from rankscope.demo import STUDIES_DIR
    from rankscope.study.tune import plan_tuning

    with throwaway_method():
        spec = load_study(STUDIES_DIR / name)
        runs = plan_runs(spec)
        new = [run for run in runs if run.method == "throwaway"]
        if name.startswith("tune-"):
            assert new and {run.lr_source for run in new} == {"literature"}
            assert "throwaway" in {cell.method for cell in plan_tuning(spec)}
        else:
            assert not new


def test_missing_full_rank_reference_is_refused():
    with pytest.raises(ConfigError, match="no full-rank reference"):
        plan_runs(study_from_dict(_spec(methods=["lowrank"])))


def test_empty_grid_is_refused():
    with pytest.raises(ConfigError, match="grid is empty"):
        plan_runs(study_from_dict(_spec(seeds=[])))


def test_checkpoint_steps_beyond_the_run_are_refused():
    spec = _spec()
    spec["base"]["train"]["checkpoint_steps"] = [5, 50]
    with pytest.raises(ConfigError, match="study run full-tiny-s0: train.checkpoint_steps"):
        plan_runs(study_from_dict(spec))


def test_unknown_study_key_is_refused():
    with pytest.raises(ConfigError, match="unknown config key 'study.gird'"):
        study_from_dict({"gird": {}})


def test_nothing_is_trained_when_the_study_is_invalid(tmp_path):
    spec = study_from_dict(_spec(methods=["full", "cola"]))
    spec.method_overrides = {"cola": {"method": {"rank": 100000}}}
    with pytest.raises(RankscopeError):
        run_study(None, tmp_path / "study", spec=spec)
    assert not (tmp_path / "study" / "runs").exists() or not any((tmp_path / "study" / "runs").iterdir())


@pytest.mark.parametrize("name", ["demo.yaml", "demo-quick.yaml", "beyond-perplexity.yaml", "tune-tiny.yaml",
                                  "tune-20m.yaml", "sweep-refactor-tiny.yaml"])
def test_shipped_study_files_are_valid(name):
    from rankscope.demo import STUDIES_DIR
    from rankscope.study import analysis_settings
    from rankscope.study.tune import plan_tuning

    spec = load_study(STUDIES_DIR / name)
    runs = plan_runs(spec)
    assert len(runs) == (len(spec.grid.methods) + len(spec.controls)) * len(spec.grid.presets) * len(spec.grid.seeds)
    analysis_settings(spec)
    cells = plan_tuning(spec)
    assert len(cells) == (len(spec.grid.methods) if name.startswith(("tune-", "sweep-")) else 0)


def test_the_demo_trains_in_the_regime_its_lrs_were_tuned_in():
    """demo.yaml runs every method and the frozen control, >= 3 seeds, at the tiny defaults that
    tune-tiny.yaml chose (shared-dense protocol) in the same model, data, schedule and periodic work."""
    from rankscope import methods
    from rankscope.demo import STUDIES_DIR
    from rankscope.methods.tuned import tuned_table

    demo, tuning = load_study(STUDIES_DIR / "demo.yaml"), load_study(STUDIES_DIR / "tune-tiny.yaml")
    assert demo.base == tuning.base and demo.method_overrides == tuning.method_overrides
    assert load_study(STUDIES_DIR / "sweep-refactor-tiny.yaml").base == demo.base  # the refactor period's sweep too
    assert set(tuning.grid.methods) == set(methods.method_names())  # `methods: all`
    # The demo lists its methods (a 12-minute budget on 2 cores: APOLLO, APOLLO-Mini, GoLore, SPAM,
    # Stable-SPAM and SwitchLoRA are tuned here but left out, demo.yaml says so); each one it lists
    # has a tuned lr for this regime. A method added later is not in the demo until it is listed.
    tuned = {name for name, values in tuned_table()["tiny"].items() if "lr" in values}
    assert set(demo.grid.methods) <= tuned & set(methods.method_names())
    assert {"apollo", "apollo_mini", "golore", "spam", "stable_spam", "switchlora"}.isdisjoint(demo.grid.methods)
    assert demo.controls == tuning.controls == methods.control_names() == ["frozen"]
    assert tuning.tune.protocol == "shared-dense"
    assert demo.grid.presets == tuning.grid.presets == ["tiny"] and len(demo.grid.seeds) >= 3
    # The lrs were chosen on the tuning seeds' validation loss: the demo's runs are other seeds.
    assert not set(demo.grid.seeds) & (set(tuning.tune.seeds) | set(tuning.tune.refine.seeds))
    assert tuning.tune.steps is None  # the tuning runs are as long as the demo's
    # The control's own lr drives no parameter once the dense lrs are shared; it has none tuned.
    assert {run.lr_source for run in plan_runs(demo) if run.method != "frozen"} == {"tuned here"}
    # Every method and the control train their embeddings, head and norms at one shared dense lr.
    from rankscope.train.setup import resolve_optim

    shared = {tuple(resolve_optim(run.config, methods.get(run.method)).roles[r]["lr"] for r in ("embed", "head", "norm"))
              for run in plan_runs(demo)}
    assert len(shared) == 1 and len(set(next(iter(shared)))) == 1, shared
    # The shipped lrs are claimed as tuned for the demo's runs (same regime), not for demo-quick's.
    from rankscope.config import config_to_dict
    from rankscope.study.regime_record import shipped_budget

    assert all(shipped_budget("tiny", config_to_dict(run.config)) for run in plan_runs(demo))
    quick = load_study(STUDIES_DIR / "demo-quick.yaml")
    assert not any(shipped_budget("tiny", config_to_dict(run.config)) for run in plan_runs(quick))


@pytest.mark.slow
def test_the_literature_study_trains_a_few_steps_at_60m_on_cpu(tmp_path):
    """The 60m cell of beyond-perplexity.yaml, on the embedded corpus instead of C4, 2 steps."""
    from rankscope.demo import STUDIES_DIR

    spec = load_study(STUDIES_DIR / "beyond-perplexity.yaml")
    spec.grid.methods, spec.grid.presets, spec.grid.seeds = ["full"], ["60m"], [0]
    spec.base["data"] = {"seq_len": 256, "val_sequences": 4, "probe_sequences": 4}
    spec.base["train"].update(batch_size=2, micro_batch_size=1, precision="fp32", eval_every=0, device="cpu")
    spec.preset_overrides["60m"]["train"] = {"steps": 2, "checkpoint_every": 2}
    result = run_study(None, tmp_path / "bp", stages=("train",), spec=spec)
    assert result["failed"] == []
    import json
    from dataclasses import replace

    from rankscope.models import count_parameters, get_preset

    summary = json.loads((tmp_path / "bp" / "runs" / "full-60m-s0" / "summary.json").read_text())
    # The 60m shapes with the embedded tokenizer's 8192-token vocabulary instead of T5's.
    assert summary["steps"] == 2
    assert summary["params"] == count_parameters(replace(get_preset("60m"), vocab_size=8192))


def test_a_second_driver_on_the_same_study_folder_is_refused(tmp_path):
    import fcntl

    out = tmp_path / "study"
    out.mkdir()
    with open(out / ".driver.lock", "w") as held:  # what a running `rankscope study` holds
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        with pytest.raises(RankscopeError, match=r"another `rankscope study` \(pid 4242\) is driving"):
            run_study(None, out, stages=("predict",), spec=study_from_dict(_spec()))
    assert not (out / "predictor_features.csv").exists()
