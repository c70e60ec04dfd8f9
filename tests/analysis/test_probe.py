"""The probe loss: the study's mean of per-batch means by default, the exact token mean as ours."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rankscope.analysis import AnalysisError
from rankscope.analysis.probe import Probe
from rankscope.models import build_model, get_preset, token_losses
from rankscope.train import evaluate_loss


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(dataclasses.replace(get_preset("tiny"), num_layers=1, vocab_size=128)).eval()


def test_batch_mean_is_the_mean_of_per_batch_means_hand_worked(model):
    # 3 sequences in batches of 2: batches {0, 1} and {2}. The study's compute_nll_loss averages
    # the two batch means, so sequence 2 weighs twice a sequence of the first batch.
    sequences = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        per_sequence = token_losses(model, sequences).double().mean(1)
    batch_mean = ((per_sequence[0] + per_sequence[1]) / 2 + per_sequence[2]) / 2
    token_mean = per_sequence.mean()
    probe = Probe(sequences, batch_size=2)
    assert probe.loss_average == "batch_mean"
    assert probe.loss(model) == pytest.approx(float(batch_mean), rel=1e-12)
    assert Probe(sequences, batch_size=2, loss_average="token").loss(model) == pytest.approx(float(token_mean), rel=1e-12)
    assert abs(float(batch_mean - token_mean)) > 1e-6  # the example separates the two
    assert probe.batch_weights() == [0.5, 0.5]
    assert Probe(sequences, batch_size=2, loss_average="token").batch_weights() == pytest.approx([2 / 3, 1 / 3])


def test_token_mean_is_the_trainers_exact_loss_bit_for_bit_and_both_agree_on_equal_batches(model):
    sequences = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    exact = evaluate_loss(model, sequences, 3, torch.device("cpu"))["loss"]
    assert Probe(sequences, batch_size=3, loss_average="token").loss(model) == exact
    one_batch = Probe(sequences, batch_size=4)
    assert one_batch.loss(model) == Probe(sequences, batch_size=4, loss_average="token").loss(model)
    with pytest.raises(AnalysisError, match="loss_average"):
        Probe(sequences, loss_average="sum")
