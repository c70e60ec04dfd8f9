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
    default = lr_choice({"optim": {"lr": None}}, "galore", "60m")
    assert (default.lr, default.source, default.tuned) == (0.01, LITERATURE, False)  # GaLore's harness default
    assert lr_choice({}, "full", "60m").lr == 1e-3
    unknown = lr_choice({}, "not-a-method", "tiny")
    assert unknown.source == UNKNOWN and math.isnan(unknown.lr)


def test_lr_provenance_of_shipped_tuned_defaults_and_of_the_tune_stage(monkeypatch):
    from rankscope.methods import tuned

    monkeypatch.setattr(tuned, "tuned_table", lambda: {"tiny": {"galore": {"lr": 0.02}}})
    regime = {"data.source": "embedded", "data.tokenizer": "bpe", "data.vocab_size": 2048, "data.seq_len": 64,
              "model.overrides": {"num_layers": 2}, "train.steps": 250, "train.batch_size": 16}
    monkeypatch.setattr(tuned, "tuned_source", lambda: {"tiny": {"study": "studies/tune-tiny.yaml", "commit": "abc",
                                                                 "document": "docs/tuning.md", "regime": regime}})
    in_regime = {"data": {"source": "embedded", "tokenizer": "bpe", "vocab_size": 2048, "seq_len": 64},
                 "model": {"preset": "tiny", "overrides": {"num_layers": 2}}, "train": {"steps": 250, "batch_size": 16}}
    shipped = lr_choice(in_regime, "galore", "tiny")
    assert (shipped.lr, shipped.source, shipped.tuned) == (0.02, tuned.TUNED_HERE, True)
    assert shipped.budget == "studies/tune-tiny.yaml at commit abc (docs/tuning.md)"
    # The same lr in another regime (here 24 steps) is used, but not counted as tuned for it.
    shorter = {**in_regime, "train": {"steps": 24, "batch_size": 16}}
    other = lr_choice(shorter, "galore", "tiny")
    assert (other.lr, other.source, other.tuned) == (0.02, "tuned here, for another regime", False)
    assert lr_choice(in_regime, "full", "tiny").source == LITERATURE  # no shipped value: the literature's
    # regime.json knows that the tune stage chose the lr the run's config.yaml holds.
    recorded = lr_choice({"optim": {"lr": 0.004}}, "full", "tiny",
                         {"lr": 0.004, "lr_source": "tuned in this study", "lr_budget": "tune stage of study s"})
    assert (recorded.source, recorded.budget) == ("tuned in this study", "tune stage of study s")
    assert lr_choice({"optim": {"lr": 0.004}}, "full", "tiny", {"lr": 0.004, "lr_source": "run"}).source == SET_BY_RUN


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


def test_runs_not_below_the_unigram_perplexity_are_named(tmp_path):
    from pathlib import Path

    import pandas as pd

    from rankscope.report.collect import Study
    from rankscope.report.regime import LrChoice, Regime, regime_lines

    table = pd.DataFrame([{"preset": "tiny", "method": m, "seeds": 3, "val_ppl_mean": ppl,
                           "lr_choices": [LrChoice(1e-3, LITERATURE)]} for m, ppl in (("full", 900.0), ("galore", 700.0))])
    regime = Regime(table, unigram_ppl={"tiny": 784.3})
    empty = pd.DataFrame(columns=["run", "method", "preset", "seed", "step", "task", "acc", "acc_stderr", "n"])
    study = Study(Path(tmp_path), pd.DataFrame(), {}, empty, pd.DataFrame(), None)
    lines = regime_lines(regime, "tiny", study)
    assert lines[0].startswith("Unigram perplexity of the validation split: **784.3**")
    assert "between 700.0 and 900.0" in lines[0] and "(galore)" not in lines[0]  # a range, not a ranking
    assert "Not below the unigram perplexity: full — these runs predict the validation tokens no better" in lines[0]
    assert lines[-1] == "Learning rates: literature default — none was tuned for this regime."
