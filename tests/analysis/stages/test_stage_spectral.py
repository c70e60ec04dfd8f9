"""spectral.csv rows of a LoRA model: the study's W (every native matrix) next to the merged W,
the pooled update numbers, and a frozen base whose ΔW is zero."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from rankscope import methods
from rankscope.analysis import spectral as S
from rankscope.analysis.stages.spectral import spectral_matrices, spectral_rows
from rankscope.models import build_model, get_preset

CONFIG = dataclasses.replace(get_preset("tiny"), num_layers=1, hidden_size=32, intermediate_size=48, num_heads=2, vocab_size=64)


def _lora_pair():
    torch.manual_seed(0)
    cls = methods.get("lora")
    model = cls(dataclasses.replace(cls.default_settings("tiny", CONFIG), rank=4), CONFIG, "tiny").parameterize(build_model(CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".A", ".B")):
                p.copy_(0.05 * torch.randn_like(p))
    previous = copy.deepcopy(model)
    with torch.no_grad():  # one training interval: the factors move, the frozen base does not
        for name, p in model.named_parameters():
            if name.endswith((".A", ".B")):
                p.add_(1e-3 * torch.randn_like(p))
    return previous, model


def _table(rows):
    return {(r["target"], r["matrix"], r["metric"]): r["value"] for r in rows}


def test_native_w_is_every_matrix_of_the_layer_and_merged_w_is_labelled_apart():
    previous, model = _lora_pair()
    table = _table(spectral_rows(model, spectral_matrices(previous, factors=False)))
    native = {m for (t, m, _) in table if t == "W_native"} - {"mean"}
    assert len(native) == 7 * 3 and {m.rsplit(".", 1)[1] for m in native} == {"weight", "A", "B"}
    # The study's mean: every native matrix weighs the same (base, A and B of each projection).
    params = dict(model.named_parameters())
    expected = np.mean([S.effective_rank(params[m].detach().double()) for m in native])
    assert table[("W_native", "mean", "effective_rank")] == pytest.approx(expected, rel=1e-10)
    merged = np.mean([S.effective_rank(module.effective_weight().detach().double())
                      for name, module in model.named_modules() if hasattr(module, "effective_weight")])
    assert table[("W", "mean", "effective_rank")] == pytest.approx(merged, rel=1e-10)
    assert table[("W_native", "mean", "effective_rank")] < table[("W", "mean", "effective_rank")]  # the factors are rank <= 4
    assert table[("W_native", "layers.0.mlp.up_proj.A", "numerical_rank")] == 4


def test_pooled_update_and_a_zero_update_that_is_not_dropped_from_the_mean():
    previous, model = _lora_pair()
    before = spectral_matrices(previous, factors=False)
    rows = spectral_rows(model, before)
    table = _table(rows)
    now, then = dict(model.named_parameters()), dict(previous.named_parameters())
    native = [m for (t, m, metric) in table if t == "dW_native" and metric == "fro_norm" and m not in ("mean", "pooled")]
    deltas = {m: (now[m] - then[m]).detach().double() for m in native}
    update = math.sqrt(sum(float(d.norm()) ** 2 for d in deltas.values()))
    prior = math.sqrt(sum(float(then[m].detach().double().norm()) ** 2 for m in native))
    assert table[("dW_native", "pooled", "fro_norm")] == pytest.approx(update, rel=1e-10)
    assert table[("dW_native", "pooled", "relative_fro_norm")] == pytest.approx(update / prior, rel=1e-10)
    counts = [table[("dW_native", m, "count_above")] for m in native]
    assert table[("dW_native", "pooled", "count_above")] == sum(counts)
    # The frozen base did not move: its ΔW is zero, its gap 0 (the study's value), and the mean
    # over matrices counts it (it used to be nan and silently left out of the mean).
    base = "layers.0.self_attn.q_proj.weight"
    assert table[("dW_native", base, "fro_norm")] == 0 and table[("dW_native", base, "spectral_gap")] == 0
    gaps = [table[("dW_native", m, "spectral_gap")] for m in native]
    assert table[("dW_native", "mean", "spectral_gap")] == pytest.approx(np.mean(gaps), rel=1e-12)
    assert sum(g == 0 for g in gaps) == 7
    # Our variant: an undefined gap stays undefined and so does the mean: nothing is dropped silently.
    ours = _table(spectral_rows(model, before, undefined=math.nan))
    assert math.isnan(ours[("dW_native", base, "spectral_gap")]) and math.isnan(ours[("dW_native", "mean", "spectral_gap")])
    assert all(r["applicable"] for r in rows)
