"""The prepare stage: a study tokenizes in the driver, before any job; a job never tokenizes and
fails at once when its data is not in the token cache."""

import json

import pytest
import yaml
from study_helpers import small_study_dict, small_text_study, write_corpus, write_study

from rankscope.cli import main
from rankscope.study import execute_job, plan_runs, run_study
from rankscope.study.stages import train_jobs


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("RANKSCOPE_CACHE", str(cache))
    return cache


def _prepared_folders(cache):
    return sorted(path.parent.name for path in cache.glob("shards/*/meta.json"))


def test_the_prepare_stage_alone_fills_the_token_cache_and_starts_no_job(tmp_path, fresh_cache):
    spec = small_text_study(write_corpus(tmp_path / "corpus.txt"), methods=["full"], seeds=[0, 1])
    out = tmp_path / "study"
    result = run_study(None, out, stages=("prepare",), spec=spec)
    assert result["failed"] == []
    assert len(_prepared_folders(fresh_cache)) == 1  # both runs share one data config: tokenized once
    assert list(fresh_cache.glob("tokenizers/*/rankscope_tokenizer.json"))
    assert not (out / "jobs").exists() and not (out / "jobs.json").exists()
    assert not any((out / "runs").iterdir())
    # A job of the study now finds its data: it trains without tokenizing anything.
    outcome = execute_job(train_jobs(plan_runs(spec)[:1], out / "runs")[0], out)
    assert outcome["state"] == "done", outcome
    assert "tokenizing" not in (out / "logs" / "train" / "full-tiny-s0.log").read_text()


def test_a_job_whose_data_is_not_prepared_fails_at_once_and_tokenizes_nothing(tmp_path, fresh_cache):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "study"
    job = train_jobs(plan_runs(small_text_study(corpus, methods=["full"], seeds=[0])), out / "runs")[0]
    outcome = execute_job(job, out)
    assert outcome["state"] == "failed"
    assert "the BPE tokenizer of" in outcome["error"] and "is not in the token cache" in outcome["error"]
    assert "--stage prepare" in outcome["error"] and "RANKSCOPE_CACHE" in outcome["error"]
    assert not list(fresh_cache.glob("tokenizers/*/rankscope_tokenizer.json")) and not _prepared_folders(fresh_cache)

    # With the tokenizer cached (prepared for another sequence length), the missing shards are named.
    run_study(None, tmp_path / "other", stages=("prepare",), spec=small_text_study(corpus, methods=["full"], seeds=[0]))
    longer = small_text_study(corpus, seq_len=24, methods=["full"], seeds=[0])
    job = train_jobs(plan_runs(longer), tmp_path / "longer" / "runs")[0]
    outcome = execute_job(job, tmp_path / "longer")
    assert outcome["state"] == "failed" and "the token shards of" in outcome["error"], outcome
    assert len(_prepared_folders(fresh_cache)) == 1  # still only the prepared one


def test_set_gives_every_run_of_the_study_a_config_key(tmp_path, fresh_cache):
    spec = small_study_dict(methods=["full"], seeds=[0])
    spec["base"]["data"].update({"source": str(write_corpus(tmp_path / "corpus.txt")), "vocab_size": 300,
                                 "val_sequences": 4, "probe_sequences": 2})
    study_file = write_study(tmp_path / "s.yaml", spec)
    out = tmp_path / "study"
    assert main(["study", str(study_file), "--out", str(out), "--stage", "prepare", "--set", "data.seq_len=24"]) == 0
    [meta] = fresh_cache.glob("shards/*/meta.json")
    assert json.loads(meta.read_text())["seq_len"] == 24
    assert yaml.safe_load((out / "study.yaml").read_text())["base"]["data"]["seq_len"] == 24
