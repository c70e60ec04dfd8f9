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


# --- per-role learning rates and the tuning protocol (regime.json's roles, role_sources) -----------

SHARED = {"optim.embed_lr": 0.006, "optim.head_lr": 0.006, "optim.norm_lr": 0.006}


def _role_study(tmp_path, regime: dict | None, own: dict | None = None):
    """Finished runs of full, galore and the frozen control (one seed), with `regime` as regime.json
    (None: none) and `own` as the optim section of galore's config.yaml."""
    import json

    study = tmp_path / "study"
    for method in ("full", "galore", "frozen"):
        run = study / "runs" / f"{method}-tiny-s0"
        run.mkdir(parents=True)
        optim = (own or {}) if method == "galore" else {}
        (run / "config.yaml").write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "method": {"name": method},
                                                         "optim": optim, "train": {"seed": 0, "steps": 10}}))
        (run / "summary.json").write_text(json.dumps({"method": method, "preset": "tiny", "seed": 0, "steps": 10,
                                                      "val_loss": 5.0, "val_ppl": math.exp(5.0), "params": 1e6,
                                                      "tokens": 1e4}))
    if regime is not None:
        (study / "regime.json").write_text(json.dumps(regime))
    return load_study(study)


def _recorded(method: str, lr: float, dense: float | None, source: str) -> dict:
    """A regime.json run entry as rankscope.study.regime_record writes it."""
    roles = {"blocks": {"lr": lr, "weight_decay": 0.0}}
    roles.update({role: {"lr": dense if dense is not None else lr, "weight_decay": 0.0} for role in ("embed", "head", "norm")})
    return {"method": method, "preset": "tiny", "seed": 0, "control": method == "frozen", "lr": lr,
            "lr_source": "tuned in this study", "lr_budget": "tune stage of study s", "roles": roles,
            "role_sources": {role: source for role in ("embed", "head", "norm")}}


def test_the_regime_table_shows_each_roles_lr_and_the_shared_dense_protocol(tmp_path):
    from rankscope.report.regime import regime_display, regime_lines

    runs = {f"{m}-tiny-s0": _recorded(m, lr, 0.006, "tuned in this study")
            for m, lr in (("full", 0.004), ("galore", 0.02), ("frozen", 0.001))}
    study = _role_study(tmp_path, {"tune_protocol": "shared-dense", "shared_dense": {"tiny": SHARED},
                                   "controls": ["frozen"], "informative_margin": 0.2, "runs": runs})
    regime = study_regime(study)
    shown = regime_display(regime, "tiny").set_index("method")
    assert list(shown.index) == ["full", "galore", "frozen (control)"]
    assert shown.loc["galore", "block lr"] == "0.02" and shown.loc["galore", "block lr from"].startswith("tuned in this study")
    for column in ("embeddings lr", "head lr", "norms lr"):
        assert set(shown[column]) == {"0.006 (shared, tuned in this study)"}, column
    lines = regime_lines(regime, "tiny", study)
    assert ("Tuning protocol shared-dense: stage 1 tuned full rank's block lr jointly with one lr for the embeddings, "
            "head and norms (chosen: 0.006); stage 2 kept that lr for every method and the control and tuned only each "
            "method's own lr, so the methods differ only in what they do to the block matrices.") in lines
    assert bool(regime.table.set_index("method").loc["frozen", "control"])


def test_the_independent_protocol_says_the_dense_lr_follows_each_method(tmp_path):
    from rankscope.report.regime import regime_display, regime_lines

    runs = {f"{m}-tiny-s0": _recorded(m, lr, None, "method lr") for m, lr in (("full", 0.004), ("galore", 0.02))}
    study = _role_study(tmp_path, {"tune_protocol": "independent", "shared_dense": {}, "runs": runs})
    regime = study_regime(study)
    assert set(regime_display(regime, "tiny")["embeddings lr"]) == {"= method lr"}
    lines = regime_lines(regime, "tiny", study)
    assert any(line.startswith("Tuning protocol independent: each method's lr was tuned on its own; each method's "
                               "single lr also drives its embeddings, head and norms (as in the official harnesses)")
               for line in lines)


def test_an_older_regime_json_without_roles_still_builds(tmp_path):
    from rankscope.report.regime import regime_display, regime_lines

    old = {"seeds": [0], "runs": {"full-tiny-s0": {"lr": 0.004, "lr_source": "run"}}}  # before roles and protocols
    # galore's own config sets its embeddings' lr: read from config.yaml where regime.json has no roles.
    study = _role_study(tmp_path, old, own={"embed_lr": 0.02})
    regime = study_regime(study)
    shown = regime_display(regime, "tiny").set_index("method")
    assert shown.loc["full", "block lr"] == "0.004" and shown.loc["full", "embeddings lr"] == "= method lr"
    assert shown.loc["galore", "embeddings lr"] == "0.02 (set by the run)" and shown.loc["galore", "head lr"] == "= method lr"
    lines = regime_lines(regime, "tiny", study)
    assert not any("Tuning protocol" in line for line in lines)
    assert any(line.startswith("The embeddings, head and norms lrs differ between methods") for line in lines)
    # With no regime.json at all, every role follows its method's lr, and the line says what that means.
    other = _role_study(tmp_path / "bare", None)
    assert any(line.startswith("Each method's single lr also drives its embeddings, head and norms")
               for line in regime_lines(study_regime(other), "tiny", other))


def test_a_roles_cell_names_its_source():
    from rankscope.report.regime import FOLLOWS_METHOD_LR, role_lr_text

    recorded = _recorded("galore", 0.02, 0.01, "run")
    assert role_lr_text("embed", {}, recorded, None) == f"0.01 ({SET_BY_RUN})"
    assert role_lr_text("embed", {}, recorded, {"optim.embed_lr": 0.01}) == f"0.01 ({SET_BY_RUN})"  # not stage 1's
    tuned = _recorded("galore", 0.02, 0.01, "tuned in this study")
    assert role_lr_text("embed", {}, tuned, {"optim.embed_lr": 0.01}) == "0.01 (shared, tuned in this study)"
    assert role_lr_text("embed", {}, tuned, None) == "0.01 (tuned in this study)"  # tuned, but not shared
    assert role_lr_text("head", {}, _recorded("galore", 0.02, None, "method lr"), None) == FOLLOWS_METHOD_LR
    shipped = _recorded("galore", 0.02, 0.003, "tuned here, for another regime")
    assert role_lr_text("norm", {}, shipped, None) == "0.003 (tuned here, for another regime)"
    assert role_lr_text("norm", {"optim": {"norm_lr": 0.5}}, None, None) == f"0.5 ({SET_BY_RUN})"
