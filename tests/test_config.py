import pytest

from rankscope.config import build_config, config_to_dict, load_config, save_config
from rankscope.errors import ConfigError


def test_defaults_resolve_the_full_method():
    cfg = build_config()
    assert cfg.method.name == "full"
    assert cfg.model.preset == "tiny"
    assert cfg.train.steps > 0


def test_overrides_are_typed():
    cfg = build_config({}, ["train.steps=12", "optim.lr=3e-4", "train.checkpoint_steps=4,8", "train.compile=true"])
    assert cfg.train.steps == 12 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.checkpoint_steps == [4, 8]
    assert cfg.train.compile is True


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes'.*'train.steps'"):
        build_config({}, ["train.stpes=3"])


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="unknown config key 'trian'.*'train'"):
        build_config({"trian": {"steps": 3}})


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        build_config({}, ["train.steps=many"])
    with pytest.raises(ConfigError, match="train.precision"):
        build_config({}, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="train.steps must be positive"):
        build_config({}, ["train.steps=0"])


def test_checkpoint_steps_beyond_the_run_are_rejected():
    with pytest.raises(ConfigError, match="checkpoint_steps"):
        build_config({}, ["train.steps=10", "train.checkpoint_steps=5,20"])


def test_unknown_method_and_preset_suggest_names():
    with pytest.raises(Exception, match="did you mean 'full'"):
        build_config({}, ["method.name=fulll"])
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        build_config({}, ["model.preset=tinny"])


def test_unknown_method_setting_is_rejected():
    with pytest.raises(ConfigError, match="unknown config key 'method.rank'"):
        build_config({}, ["method.rank=4"])  # the full-rank method has no rank


def test_yaml_round_trip(tmp_path):
    cfg = build_config({}, ["train.steps=7", "data.seq_len=64"])
    path = tmp_path / "c.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert config_to_dict(again) == config_to_dict(cfg)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
