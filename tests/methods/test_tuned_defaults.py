"""The defaults tuned here for tiny and 20m: shipped for every method, used by every run at those
presets, literature everywhere else, and shown by `rankscope methods` with their kind."""

import json
from pathlib import Path

import pytest

from rankscope import methods
from rankscope.config import build_config
from rankscope.methods.tuned import LITERATURE, TUNED_HERE, default_kinds, optim_defaults_for, tuned_source, tuned_table
from rankscope.train.setup import resolve_optim

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("preset", ["tiny", "20m"])
def test_every_shipped_tuned_lr_is_what_runs_at_its_preset(preset):
    table = tuned_table()
    assert set(table[preset]) <= set(methods.names())
    tuned = [name for name in table[preset] if "lr" in table[preset][name]]
    assert tuned, f"no method has a tuned lr at {preset}"
    for name in tuned:
        cls = methods.get(name)
        lr = table[preset][name]["lr"]
        assert optim_defaults_for(cls, preset).lr == lr and 1e-5 < lr < 1.0
        assert default_kinds(cls, preset)["lr"] == TUNED_HERE
        # A run at the preset resolves its lr from the file; its own optim.lr still wins.
        cfg = build_config({}, [f"model.preset={preset}", f"method.name={name}"])
        assert resolve_optim(cfg, cls).lr == lr
        own = build_config({}, [f"model.preset={preset}", f"method.name={name}", "optim.lr=0.0123"])
        assert resolve_optim(own, cls).lr == 0.0123
    source = tuned_source()[preset]
    assert source["study"] == f"studies/tune-{preset}.yaml" and len(source["commit"]) >= 7


@pytest.mark.parametrize("preset", ["tiny", "20m"])
def test_every_shipped_tuned_value_is_its_measurement(preset):
    """tuned_defaults.yaml holds exactly what the tuning study chose (docs/tuning/tune-<preset>-chosen.json,
    the study's tune/chosen.json at the commit of the measurement): each cell's values, and the shared
    dense lrs for every member, control included. Nothing else ties the yaml to a measurement."""
    chosen = json.loads((DOCS / "tuning" / f"tune-{preset}-chosen.json").read_text())
    expected: dict[str, dict[str, float]] = {}
    for cell in chosen["cells"] + chosen.get("controls", []):
        if str(cell["preset"]) == preset:
            values = {**chosen.get("shared_dense", {}).get(preset, {}), **(cell.get("values") or {})}
            expected[cell["method"]] = {key.removeprefix("optim."): float(v) for key, v in values.items()}
    shipped = {name: {k: float(v) for k, v in values.items()} for name, values in tuned_table()[preset].items()}
    assert shipped == expected


def test_a_method_without_a_tuned_entry_runs_on_its_literature_lr_labelled_literature(tmp_path):
    """Adding a method needs no tuning run: at tiny / 20m it falls back to its literature values,
    and every place that says where an lr came from says "literature"."""
    from helpers import throwaway_method  # tests/ is on sys.path
    from rankscope.report.regime import LITERATURE as REPORT_LITERATURE
    from rankscope.report.regime import lr_choice
    from rankscope.study import plan_runs, study_from_dict
    from rankscope.study.regime_record import write_regime

    with throwaway_method() as cls:
        for preset in ("tiny", "20m"):
            assert "throwaway" not in tuned_table()[preset]
            assert optim_defaults_for(cls, preset) == cls.optim_defaults(preset)
            assert set(default_kinds(cls, preset).values()) == {LITERATURE}
            resolved = resolve_optim(build_config({}, [f"model.preset={preset}", "method.name=throwaway"]), cls)
            assert resolved.lr == cls.optim_defaults(preset).lr and resolved.roles == {}
        spec = study_from_dict({"name": "new", "grid": {"methods": ["full", "throwaway"], "presets": ["tiny"]},
                                "controls": []})
        runs = {run.method: run for run in plan_runs(spec)}
        assert runs["throwaway"].lr_source == LITERATURE and runs["full"].lr_source == TUNED_HERE
        regime = json.loads(write_regime(tmp_path, list(runs.values()), spec).read_text())
        assert regime["runs"][runs["throwaway"].name]["lr_source"] == LITERATURE
        choice = lr_choice({"method": {"name": "throwaway"}}, "throwaway", "tiny")
        assert choice.source == REPORT_LITERATURE and choice.lr == cls.optim_defaults("tiny").lr


@pytest.mark.parametrize("preset", ["60m", "130m", "350m", "1b", "7b"])
def test_the_literature_values_stay_the_defaults_from_60m_up(preset):
    assert preset not in tuned_table()
    for name in methods.names():
        cls = methods.get(name)
        assert optim_defaults_for(cls, preset) == cls.optim_defaults(preset)
        assert set(default_kinds(cls, preset).values()) == {LITERATURE}


@pytest.mark.parametrize("preset", ["tiny", "20m"])
def test_each_small_preset_ships_one_dense_lr_for_every_method_and_the_control(preset):
    """Both presets were tuned with the shared-dense protocol: every method and control gets stage
    1's embeddings / head / norms lr, each method its own lr from stage 2; the source records
    whether the tuning regime could separate the methods (its control)."""
    source = tuned_source()[preset]
    assert source["protocol"] == "shared-dense"
    dense = source["shared_dense"]
    assert set(dense) == {"optim.embed_lr", "optim.head_lr", "optim.norm_lr"} and len(set(dense.values())) == 1
    shipped = tuned_table()[preset]
    assert set(methods.names()) - set(shipped) <= set(methods.method_names())  # the control is always tuned
    for name in shipped:
        cls = methods.get(name)
        defaults = optim_defaults_for(cls, preset)
        assert (defaults.embed_lr, defaults.head_lr, defaults.norm_lr) == tuple(dense[k] for k in sorted(dense))
        kinds = default_kinds(cls, preset)
        assert kinds["embed_lr"] == kinds["head_lr"] == kinds["norm_lr"] == TUNED_HERE
        resolved = resolve_optim(build_config({}, [f"method.name={name}", f"model.preset={preset}"]), cls)
        assert resolved.roles == {role: {"lr": dense[f"optim.{role}_lr"]} for role in ("embed", "head", "norm")}
    verdict = source["informativeness"]
    assert verdict["control"] == "frozen" and verdict["margin"] == 0.2
    assert verdict["verdict"] == ("can separate" if verdict["gap"] > verdict["margin"] else "cannot separate")
    assert verdict["gap"] == pytest.approx(verdict["control_score"] - verdict["best_score"])


def test_methods_shows_which_kind_each_default_is(capsys):
    from rankscope.cli import main

    assert main(["methods", "--preset", "tiny"]) == 0
    tiny = capsys.readouterr().out
    assert main(["methods", "--preset", "60m"]) == 0
    large = capsys.readouterr().out
    # At tiny: each shipped entry's lr and dense lr cell is tuned here (the control's own lr, which
    # drives no parameter once the dense lrs are set, stays the literature's); a method without an
    # entry is literature throughout; from 60m up all is literature.
    shipped = tuned_table()["tiny"]
    tuned_lrs = sum("lr" in values for values in shipped.values())
    assert tiny.count("(tuned here)") == tuned_lrs + len(shipped)
    assert tiny.count("(literature)") == len(methods.names()) - tuned_lrs
    assert "frozen (control)" in tiny and tiny.count("0.03/0.03/0.03 (tuned here)") == len(shipped)
    assert large.count("(literature)") == len(methods.names()) and "(tuned here)" not in large
    assert large.count("= lr ") == len(methods.names())
