"""Activation similarity as the study computes it: the layers of HF `hidden_states` (the last one
after the final RMSNorm) and every metric of its 6_activations_comparison.py, per layer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from rankscope.analysis.probe import Probe
from rankscope.analysis.stages.similarity import hidden_states, similarity_rows
from rankscope.export import hf_config, hf_state_dict
from rankscope.models import build_model, get_preset

CONFIG = dataclasses.replace(get_preset("tiny"), num_layers=2, vocab_size=256)


def _model(seed: int):
    torch.manual_seed(seed)
    return build_model(dataclasses.replace(CONFIG, init_std=0.05)).eval()


def _hf(model):
    hf = transformers.LlamaForCausalLM(hf_config(CONFIG))
    hf.load_state_dict(hf_state_dict(model), strict=False)
    return hf.eval()


def test_final_norm_hidden_states_are_hf_hidden_states():
    model = _model(0)
    batch = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = hidden_states(model, batch, "final_norm")
        theirs = _hf(model)(batch, output_hidden_states=True).hidden_states
        raw = hidden_states(model, batch, "block_output")
    assert len(ours) == len(theirs) == CONFIG.num_layers + 1
    for layer, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), layer
    # Ours variant: the raw last block output, which HF's last entry is not.
    assert torch.equal(raw[0], ours[0]) and not torch.allclose(raw[-1], theirs[-1], atol=1e-3)


def _study_metrics(baseline: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """The study's formulas written out (6_activations_comparison.py, _compute_metrics, fp64)."""
    x, y = baseline.double(), target.double()
    base_norm, target_norm = x.norm(dim=-1).mean(), y.norm(dim=-1).mean()
    l2 = (x - y).norm(dim=-1).mean()
    xc, yc = x - x.mean(0), y - y.mean(0)
    cka = ((yc.T @ xc) ** 2).sum() / torch.sqrt(((xc.T @ xc) ** 2).sum() * ((yc.T @ yc) ** 2).sum())
    return {
        "reference_mean_norm": float(base_norm), "mean_norm": float(target_norm), "l2": float(l2),
        "relative_l2": float(l2 / base_norm), "cosine": float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean()),
        "cka": float(cka),
    }


def test_similarity_rows_reproduce_the_studys_metrics_on_every_layer():
    reference, model = _model(0), _model(1)
    sequences = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(2))
    probe = Probe(sequences, batch_size=2)  # three batches, accumulated
    rows = similarity_rows(model, reference, probe)
    got = {(r["layer"], r["metric"]): r["value"] for r in rows}
    with torch.no_grad():
        hf_reference = _hf(reference)(sequences, output_hidden_states=True).hidden_states
        hf_model = _hf(model)(sequences, output_hidden_states=True).hidden_states
    for layer, (x, y) in enumerate(zip(hf_reference, hf_model)):
        expected = _study_metrics(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
        for metric, value in expected.items():
            assert got[(layer, metric)] == pytest.approx(value, rel=1e-4), (layer, metric)
    # The norms differ between the variants only at the last layer.
    raw = {(r["layer"], r["metric"]): r["value"] for r in similarity_rows(model, reference, probe, "block_output")}
    assert raw[(1, "mean_norm")] == pytest.approx(got[(1, "mean_norm")], rel=1e-12)
    assert raw[(2, "mean_norm")] != pytest.approx(got[(2, "mean_norm")], rel=1e-3)
