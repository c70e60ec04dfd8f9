"""Model presets: shapes, parameter counts, lookup errors."""

from __future__ import annotations

import pytest
import torch

from rankscope.errors import ConfigError
from rankscope.models import PRESETS, build_model, get_preset
from rankscope.models.llama import count_parameters

# The small members of the scaling family (rankscope.scaling.family); vocab 8192 like tiny.
SCALING_SMALL = {"w32l2", "w48l2", "w64l2", "w96l3", "w192l4"}


def test_all_documented_presets_exist():
    assert set(PRESETS) == {"tiny", "20m", "60m", "130m", "350m", "1b", "7b", "w384l6"} | SCALING_SMALL
    for name, cfg in PRESETS.items():
        assert cfg.vocab_size == (8192 if name == "tiny" or name in SCALING_SMALL else 32000)
        assert cfg.max_seq_len == (2048 if name in ("1b", "7b") else 1024)


@pytest.mark.parametrize("name", ["tiny", "20m", "60m", "130m", "350m", "1b"])
def test_closed_form_count_matches_the_built_module_tree(name):
    # Built on the meta device: real shapes, no memory, no init cost.
    with torch.device("meta"):
        model = build_model(get_preset(name))
    assert model.num_parameters() == count_parameters(get_preset(name))


def test_known_sizes():
    assert 2.5e6 <= count_parameters(PRESETS["tiny"]) <= 3.2e6
    assert count_parameters(PRESETS["tiny"]) == 2_901_120
    assert count_parameters(PRESETS["60m"]) == 58_073_600
    assert 130e6 < count_parameters(PRESETS["130m"]) < 140e6
    assert 360e6 < count_parameters(PRESETS["350m"]) < 375e6
    assert 1.3e9 < count_parameters(PRESETS["1b"]) < 1.4e9
    # Same shapes as the released LLaMA-7B, whose parameter count is 6,738,415,616.
    assert count_parameters(PRESETS["7b"]) == 6_738_415_616


def test_tiny_builds_for_real():
    model = build_model(get_preset("tiny"))
    assert model.num_parameters() == 2_901_120
    assert model(torch.randint(0, 8192, (1, 8))).shape == (1, 8, 8192)


def test_get_preset_returns_an_independent_copy():
    cfg = get_preset("60M")  # case-insensitive
    cfg.num_layers = 1
    assert PRESETS["60m"].num_layers == 8
    assert get_preset("60m").num_layers == 8


def test_unknown_preset_names_close_matches():
    with pytest.raises(ConfigError, match="'60m'") as raised:
        get_preset("60n")
    assert "unknown model preset '60n'" in str(raised.value)
    with pytest.raises(ConfigError, match="tiny"):
        get_preset("tinyy")
