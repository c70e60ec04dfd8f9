"""The defaults tuned here for tiny and 20m: shipped for every method, used by every run at those
presets, literature everywhere else, and shown by `rankscope methods` with their kind."""

import pytest

from rankscope import methods
from rankscope.config import build_config
from rankscope.methods.tuned import LITERATURE, TUNED_HERE, default_kinds, optim_defaults_for, tuned_source, tuned_table
from rankscope.train.setup import resolve_optim


@pytest.mark.parametrize("preset", ["tiny", "20m"])
def test_every_method_has_a_tuned_lr_at_the_small_presets(preset):
    table = tuned_table()
    assert set(methods.method_names()) <= set(table[preset]) <= set(methods.names())
    for name in methods.method_names():
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
    for name in methods.names():
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
    # At tiny: every method's lr and every dense lr cell is tuned here (the control's own lr, which
    # drives no parameter once the dense lrs are set, stays the literature's); from 60m up all is literature.
    assert tiny.count("(tuned here)") == 2 * len(methods.names()) - 1 and tiny.count("(literature)") == 1
    assert "frozen (control)" in tiny and tiny.count("0.03/0.03/0.03 (tuned here)") == len(methods.names())
    assert large.count("(literature)") == len(methods.names()) and "(tuned here)" not in large
    assert large.count("= lr ") == len(methods.names())
