"""The regime block: where each run's lr came from, each task's chance level, and the validation
split's unigram perplexity computed from the runs' own data config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from rankscope.config import DataConfig, config_to_dict
from rankscope.data import prepare_data
from rankscope.report import load_study
from rankscope.report.regime import LITERATURE, SET_BY_RUN, UNKNOWN, chance_levels, lr_choice, study_regime


def test_lr_provenance_from_the_run_config():
    assert lr_choice({"optim": {"lr": 3e-4}}, "galore", "tiny").source == SET_BY_RUN
    assert lr_choice({"optim": {"lr": 3e-4}}, "galore", "tiny").lr == 3e-4
    default = lr_choice({"optim": {"lr": None}}, "galore", "tiny")
    assert (default.lr, default.source, default.tuned) == (0.01, LITERATURE, False)  # GaLore's harness default
    assert lr_choice({}, "full", "tiny").lr == 1e-3
    unknown = lr_choice({}, "not-a-method", "tiny")
    assert unknown.source == UNKNOWN and math.isnan(unknown.lr)


def test_chance_levels_from_task_data_and_task_definitions():
    table, notes = chance_levels(["rs_speaker", "copa", "mnli", "blimp_anaphor_gender_agreement", "mystery"])
    chance = table.set_index("task")["chance"]
    assert chance["rs_speaker"] == pytest.approx(0.25)  # every shipped example has 4 choices
    assert chance["copa"] == 0.5 and chance["mnli"] == pytest.approx(1 / 3)
    assert chance["blimp_anaphor_gender_agreement"] == 0.5
    assert math.isnan(chance["mystery"]) and notes == [
        "chance level of task mystery: unknown (not a rankscope task; choice count not on record)"]


def test_unigram_perplexity_of_the_runs_data(tmp_path):
    data = DataConfig(seq_len=64, val_sequences=32, probe_sequences=16)
    study = tmp_path / "study"
    for seed in (0, 1):
        run = study / "runs" / f"full-tiny-s{seed}"
        run.mkdir(parents=True)
        config = {"model": {"preset": "tiny"}, "method": {"name": "full"}, "data": config_to_dict(data),
                  "optim": {"lr": None}, "train": {"seed": seed, "steps": 10}}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    regime = study_regime(load_study(study))
    # Independently: bincount of the training tokens, add-one smoothing, the validation targets.
    prepared = prepare_data(data)
    counts = np.bincount(np.asarray(prepared.train.array).reshape(-1).astype(np.int64), minlength=prepared.vocab_size)
    targets = prepared.val[:, 1:].reshape(-1).numpy()
    log_p = np.log((counts[targets] + 1) / (counts.sum() + prepared.vocab_size))
    assert regime.unigram_ppl == {"tiny": pytest.approx(math.exp(-log_p.mean()), rel=1e-9)}
    assert regime.notes == []
