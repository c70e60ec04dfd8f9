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
    assert set(table[preset]) == set(methods.names())
    for name in methods.names():
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


def test_methods_shows_which_kind_each_default_is(capsys):
    from rankscope.cli import main

    assert main(["methods", "--preset", "tiny"]) == 0
    tiny = capsys.readouterr().out
    assert main(["methods", "--preset", "60m"]) == 0
    large = capsys.readouterr().out
    assert tiny.count("(tuned here)") == len(methods.names()) and "(literature)" not in tiny
    assert large.count("(literature)") == len(methods.names()) and "(tuned here)" not in large
