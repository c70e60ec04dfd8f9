"""replace_linears on a real (tiny) LLaMA, and the dense export of parameterized models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from rankscope.errors import ConfigError
from rankscope.models import TARGET_LINEARS, build_model, get_preset
from rankscope.nn import (
    ColaLinear,
    LoRALinear,
    LowRankLinear,
    NotDenseError,
    SparsePlusLowRankLinear,
    dense_state_dict,
    replace_linears,
)


def _tiny_model(seed: int = 0):
    config = dataclasses.replace(get_preset("tiny"), num_layers=2, vocab_size=256, max_seq_len=32)
    torch.manual_seed(seed)
    return build_model(config)


def test_replace_all_targets_and_keep_the_rest() -> None:
    model = _tiny_model()
    calls: list[tuple[str, tuple[int, int]]] = []

    def factory(name: str, linear: nn.Linear) -> nn.Module:
        calls.append((name, tuple(linear.weight.shape)))
        return LowRankLinear.from_linear(linear, 8, name=name)

    replaced = replace_linears(model, factory)
    assert len(replaced) == 2 * len(TARGET_LINEARS)
    assert replaced == [name for name, _ in calls]
    assert "layers.0.self_attn.q_proj" in replaced and "layers.1.mlp.down_proj" in replaced
    modules = dict(model.named_modules())
    for name in replaced:
        assert isinstance(modules[name], LowRankLinear)
    # Shapes come from the replaced linears: down_proj maps ffn -> hidden.
    down = modules["layers.0.mlp.down_proj"]
    assert (down.in_features, down.out_features) == (352, 128)
    # Embeddings and head stay dense; the model still runs.
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.embed_tokens, nn.Embedding)
    logits = model(torch.randint(0, 256, (2, 10)))
    assert logits.shape == (2, 10, 256) and torch.isfinite(logits).all()
    # A second pass would wrap replacements: refused.
    with pytest.raises(TypeError, match="already a LowRankLinear"):
        replace_linears(model, factory)


def test_replace_selected_targets() -> None:
    model = _tiny_model()
    replaced = replace_linears(
        model, lambda name, linear: ColaLinear.from_linear(linear, 4, name=name), targets=["q_proj", "layers.1.mlp.up_proj"]
    )
    assert replaced == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj", "layers.1.mlp.up_proj"]
    assert isinstance(model.layers[0].mlp.up_proj, nn.Linear)
    with pytest.raises(ConfigError, match="did you mean 'up_proj'"):
        replace_linears(_tiny_model(), lambda name, linear: linear, targets=["upproj"])


def test_lora_model_starts_identical_to_the_dense_model() -> None:
    dense = _tiny_model(seed=3)
    model = _tiny_model(seed=3)
    replace_linears(model, lambda name, linear: LoRALinear.from_linear(linear, 4, alpha=8.0, name=name))
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), dense(tokens))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.endswith("proj.weight") for n in trainable)


@pytest.mark.parametrize("kind", ["lowrank", "lora", "sparse"])
def test_dense_state_dict_reproduces_logits(kind: str) -> None:
    makers = {
        "lowrank": lambda name, linear: LowRankLinear.from_linear(linear, 8, name=name),
        "lora": lambda name, linear: LoRALinear.from_linear(linear, 8, alpha=16.0, name=name),
        "sparse": lambda name, linear: SparsePlusLowRankLinear.from_linear(linear, 8, alpha=16.0, density=0.05, name=name),
    }
    model = _tiny_model()
    replace_linears(model, makers[kind])
    with torch.no_grad():  # move off the init so B = 0 cannot hide a wrong merge
        for module in model.modules():
            if hasattr(module, "B") and isinstance(module.B, nn.Parameter):
                module.B.normal_(0, 0.05)
    plain = _tiny_model(seed=9)
    plain.load_state_dict(dense_state_dict(model))
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens), model(tokens), rtol=1e-4, atol=1e-5)


def test_dense_state_dict_refuses_cola() -> None:
    model = _tiny_model()
    replace_linears(model, lambda name, linear: ColaLinear.from_linear(linear, 4, name=name))
    with pytest.raises(NotDenseError):
        dense_state_dict(model)
