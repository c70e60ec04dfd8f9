"""Downstream evaluation: the lm-eval wrapper's numerics, the local task set, task availability."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM

from rankscope.analysis import downstream
from rankscope.analysis.downstream import (
    LOCAL_TASKS,
    LOCAL_TASKS_DIR,
    DownstreamError,
    RankscopeLM,
    available_tasks,
    evaluate_model,
    load_local_task_dataset,
    offline,
    settle_hub_mode,
)
from rankscope.data.tokenizer import train_bpe
from rankscope.errors import RankscopeError
from rankscope.models import LlamaConfig, build_model

REPO = Path(__file__).resolve().parents[2]

TRAIN_TEXT = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n",
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
    "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TRAIN_TEXT * 4, 300)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_heads=2, num_layers=2, max_seq_len=64, init_std=0.2)
    return build_model(config)


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def _direct_logprob(model, tokens: list[int], n_continuation: int) -> tuple[float, bool]:
    """Sum of the last n_continuation tokens' log-probs, one unpadded forward pass."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        log_probs = F.log_softmax(model(ids)[0].double(), dim=-1)
    targets = ids[0, len(tokens) - n_continuation:]
    rows = log_probs[len(tokens) - n_continuation - 1: len(tokens) - 1]
    total = rows.gather(-1, targets[:, None]).sum().item()
    return total, bool((rows.argmax(-1) == targets).all())


def test_wrapper_is_an_lm_eval_model(model, tokenizer):
    lm = RankscopeLM(model, tokenizer)
    assert isinstance(lm, LM)
    assert lm.max_length == 64  # taken from the model's max_seq_len


def test_loglikelihood_equals_direct_log_softmax(model, tokenizer):
    lm = RankscopeLM(model, tokenizer, batch_size=2)  # several batches, padded rows of unequal length
    eos = tokenizer.eos_token_id
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    cases = [
        ("To be, or not to be,", " that is the question"),
        ("Now is the winter of our ", "discontent"),  # trailing space moves to the continuation
        ("", "Made glorious summer"),  # empty context: EOS is the prefix
        ("And", " all the clouds"),
        ("Or to take arms", " against a sea of troubles, and by opposing end them"),
    ]
    results = lm.loglikelihood(_requests("loglikelihood", cases))
    assert len(results) == len(cases)
    for (context, continuation), (got, greedy) in zip(cases, results):
        if context == "":
            tokens, n_cont = [eos] + encode(continuation), len(encode(continuation))
        else:
            stripped = context.rstrip()
            n_ctx = len(encode(stripped))
            tokens = encode(context + continuation)
            n_cont = len(tokens) - n_ctx
        expected, expected_greedy = _direct_logprob(model, tokens, n_cont)
        assert got == pytest.approx(expected, abs=1e-4)
        assert got < 0
        assert greedy == expected_greedy


def test_loglikelihood_truncates_long_inputs_on_the_left(model, tokenizer):
    lm = RankscopeLM(model, tokenizer, max_length=12)
    context, continuation = TRAIN_TEXT[0], " Now is the winter"
    # the context's trailing newline moves to the continuation; the whole text is unchanged
    tokens = tokenizer.encode(context + continuation, add_special_tokens=False)
    n_cont = len(tokens) - len(tokenizer.encode(context.rstrip(), add_special_tokens=False))
    window = tokens[-13:]  # max_length inputs + the final predicted token
    expected, _ = _direct_logprob(model, window, n_cont)
    ((got, _),) = lm.loglikelihood(_requests("loglikelihood", [(context, continuation)]))
    assert got == pytest.approx(expected, abs=1e-4)


def test_loglikelihood_greedy_flag_is_true_for_the_argmax_token(model, tokenizer):
    lm = RankscopeLM(model, tokenizer)
    context = "To be, or not to be,"
    ids = torch.tensor([tokenizer.encode(context, add_special_tokens=False)])
    with torch.no_grad():
        best = int(model(ids)[0, -1].argmax())
    worst = int(model(ids)[0, -1].argmin())
    best_text, worst_text = tokenizer.decode([best]), tokenizer.decode([worst])
    # only meaningful when the single token round-trips through the tokenizer as itself
    if tokenizer.encode(context + best_text, add_special_tokens=False)[-1] != best:
        pytest.skip("argmax token does not round-trip")
    (_, greedy_best), (_, greedy_worst) = lm.loglikelihood(
        _requests("loglikelihood", [(context, best_text), (context, worst_text)]))
    assert greedy_best is True
    assert greedy_worst is False


def test_loglikelihood_rolling_one_window_equals_full_sequence(model, tokenizer):
    text = TRAIN_TEXT[1][:60]
    tokens = tokenizer.encode(text, add_special_tokens=False)
    lm = RankscopeLM(model, tokenizer, max_length=64)
    assert len(tokens) < 64
    expected, _ = _direct_logprob(model, [tokenizer.eos_token_id] + tokens, len(tokens))
    (got,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert got == pytest.approx(expected, abs=1e-4)


def test_loglikelihood_rolling_disjoint_windows(model, tokenizer):
    """With max_length L, tokens are predicted in blocks of L; a full block sees the one token
    before it (EOS for the first); the final partial block sees the L tokens before its end."""
    text = TRAIN_TEXT[0]
    tokens = tokenizer.encode(text, add_special_tokens=False)
    length = 8
    assert len(tokens) % length != 0 and len(tokens) > 3 * length
    expected, start = 0.0, 0
    padded = [tokenizer.eos_token_id] + tokens  # padded[i] is the token before tokens[i]
    while start < len(tokens):
        end = min(start + length, len(tokens))
        if end - start == length:
            window = padded[start: end + 1]
        else:
            window = padded[end - length: end + 1]
        expected += _direct_logprob(model, window, end - start)[0]
        start = end
    lm = RankscopeLM(model, tokenizer, max_length=length)
    (got,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert got == pytest.approx(expected, abs=1e-3)


def test_generate_until_is_greedy_and_honours_stop_strings(model, tokenizer):
    context = "Now is the winter"
    tokens = tokenizer.encode(context, add_special_tokens=False)
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(10):
            next_token = int(model(torch.tensor([tokens + generated]))[0, -1].argmax())
            if next_token == tokenizer.eos_token_id:
                break
            generated.append(next_token)
    full = tokenizer.decode(generated)
    assert full, "the random model should emit something before EOS"
    lm = RankscopeLM(model, tokenizer)
    (text,) = lm.generate_until(_requests("generate_until", [(context, {"until": [], "max_gen_toks": 10})]))
    assert text == full
    stop = full[len(full) // 2:][:2]
    (cut,) = lm.generate_until(_requests("generate_until", [(context, {"until": [stop], "max_gen_toks": 10})]))
    assert cut == full[: full.index(stop)]


def test_model_training_flag_is_restored(model, tokenizer):
    model.train()
    RankscopeLM(model, tokenizer).loglikelihood(_requests("loglikelihood", [("To be", " or not")]))
    assert model.training
    model.eval()


# --------------------------------------------------------------------------- local task set


def _rows(task: str) -> list[dict]:
    with (LOCAL_TASKS_DIR / task / f"{task}.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_local_task_files_are_small_and_well_formed():
    total = sum(p.stat().st_size for p in LOCAL_TASKS_DIR.rglob("*") if p.is_file())
    assert total < 1_000_000
    assert (LOCAL_TASKS_DIR / "rankscope_local.yaml").is_file()
    for task in LOCAL_TASKS:
        rows = _rows(task)
        assert 200 <= len(rows) <= 500
        for row in rows:
            assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
            assert 0 <= row["label"] < 4
        labels = [row["label"] for row in rows]
        assert len(set(labels)) == 4  # answers are not always in the same position


def test_generator_is_deterministic(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_local_tasks.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    shipped = sorted(p.relative_to(LOCAL_TASKS_DIR) for p in LOCAL_TASKS_DIR.rglob("*") if p.is_file()
                     and "__pycache__" not in p.parts)
    regenerated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert shipped == regenerated
    match, mismatch, errors = filecmp.cmpfiles(LOCAL_TASKS_DIR, tmp_path, [str(p) for p in shipped], shallow=False)
    assert mismatch == [] and errors == []


def test_local_dataset_loader_resolves_paths_next_to_the_yaml(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "d.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "label": 1}\n')
    fake_yaml = folder / "t.yaml"
    by_relative = load_local_task_dataset(data_files={"test": "d.jsonl"}, config_source=str(fake_yaml), version=1.0)
    by_absolute = load_local_task_dataset(data_files={"test": str(folder / "d.jsonl")})
    for dataset in (by_relative, by_absolute):
        assert dataset["test"][0] == {"context": "a", "choices": ["b", "c"], "label": 1}
    with pytest.raises(DownstreamError, match="make_local_tasks"):
        load_local_task_dataset(data_files={"test": "missing.jsonl"}, config_source=str(fake_yaml))


class AnswerKeyLM(LM):
    """A stand-in model that has read the answer key: it scores the true choice of every
    item above the others (or, with `always_first`, always picks choice 0)."""

    def __init__(self, always_first: bool = False) -> None:
        super().__init__()
        self.always_first = always_first
        self.key = {}
        for task in LOCAL_TASKS:
            for row in _rows(task):
                for index, choice in enumerate(row["choices"]):
                    self.key[(row["context"], choice)] = (index, row["label"])

    def loglikelihood(self, requests, disable_tqdm=False):
        out = []
        for request in requests:
            index, label = self.key[request.args]
            favoured = 0 if self.always_first else label
            # lengths differ between choices: acc_norm divides by them, so give the favoured one 0
            out.append((0.0 if index == favoured else -100.0 * (1 + index), False))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError


def test_label_wiring_answer_key_scores_one(monkeypatch, model, tokenizer):
    monkeypatch.setattr(downstream.lm, "RankscopeLM", lambda *args, **kwargs: AnswerKeyLM())
    result = evaluate_model(model, tokenizer, tasks=["rankscope_local"], limit=20)
    assert set(result["tasks"]) == set(LOCAL_TASKS)
    for row in result["tasks"].values():
        assert row["acc"] == 1.0 and row["acc_norm"] == 1.0 and row["n"] == 20
    assert result["mean_acc"] == 1.0

    monkeypatch.setattr(downstream.lm, "RankscopeLM", lambda *args, **kwargs: AnswerKeyLM(always_first=True))
    result = evaluate_model(model, tokenizer, tasks=["rs_word"], limit=40)
    first_is_right = sum(row["label"] == 0 for row in _rows("rs_word")[:40]) / 40
    assert result["tasks"]["rs_word"]["acc"] == pytest.approx(first_is_right)
    assert first_is_right < 1.0


def test_evaluate_tiny_model_end_to_end(model, tokenizer):
    result = evaluate_model(model, tokenizer, tasks=["rankscope_local"], limit=4, batch_size=8)
    assert list(result["tasks"]) == LOCAL_TASKS
    accuracies = []
    for row in result["tasks"].values():
        assert set(row) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}
        assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["acc_norm"] <= 1.0
        assert row["n"] == 4
        accuracies.append(row["acc"])
    assert result["mean_acc"] == pytest.approx(sum(accuracies) / len(accuracies))
    assert result["unavailable"] == {}


# --------------------------------------------------------------------------- availability


@pytest.fixture
def offline_empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "hf"


def test_builtin_tasks_without_data_are_reported_not_crashing(offline_empty_cache, model, tokenizer):
    available, unavailable = available_tasks(["piqa", "rankscope_local", "blimp"])
    assert available == LOCAL_TASKS
    assert set(unavailable) == {"piqa", "blimp"}
    assert "baber/piqa" in unavailable["piqa"] and "rankscope_local" in unavailable["piqa"]
    assert "nyu-mll/blimp" in unavailable["blimp"]

    with pytest.raises(RankscopeError, match="not in the local Hugging Face cache"):
        evaluate_model(model, tokenizer, tasks=["piqa"])


def test_builtin_task_found_in_the_cache_is_available(offline_empty_cache):
    (offline_empty_cache / "hub" / "datasets--baber--piqa").mkdir(parents=True)
    available, unavailable = available_tasks(["piqa", "copa"])
    assert available == ["piqa"]
    assert "aps/super_glue" in unavailable["copa"]


def test_default_tasks_are_the_local_set_as_in_a_study_and_the_hub_group_is_the_study_suite(offline_empty_cache):
    from rankscope.study.spec import EvalSpec

    assert available_tasks(None) == (LOCAL_TASKS, {})
    assert EvalSpec().tasks == downstream.DEFAULT_TASKS == ["rankscope_local"]
    available, unavailable = available_tasks(["rankscope_hub"])
    assert available == [] and list(unavailable) == downstream.HUB_TASKS
    assert downstream.HUB_TASKS == ["piqa", "copa", "mrpc", "rte", "mnli", "arc_easy", "blimp", "sst2"]


# --------------------------------------------------------------------------- offline mode

def _clear_offline_env(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def test_settle_hub_mode_asks_nothing_for_local_tasks(monkeypatch):
    _clear_offline_env(monkeypatch)
    monkeypatch.setattr(offline, "_hub_reachable", lambda: pytest.fail("no connection attempt for local tasks"))
    assert settle_hub_mode(["rankscope_local"]) is False and settle_hub_mode(None) is False
    assert "HF_HUB_OFFLINE" not in os.environ


def test_settle_hub_mode_keeps_online_mode_when_the_hub_answers(monkeypatch):
    _clear_offline_env(monkeypatch)
    monkeypatch.setattr(offline, "_hub_reachable", lambda: True)
    assert settle_hub_mode(["piqa"]) is False
    assert "HF_HUB_OFFLINE" not in os.environ


def test_settle_hub_mode_respects_an_offline_setting(monkeypatch):
    _clear_offline_env(monkeypatch)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(offline, "_hub_reachable", lambda: pytest.fail("offline by setting: no connection attempt"))
    assert settle_hub_mode(["piqa"]) is True


def test_settle_hub_mode_sets_offline_before_the_libraries_load_without_patching_them():
    """In a fresh interpreter with an unreachable endpoint: HF_HUB_OFFLINE=1 is set before
    `datasets` and `huggingface_hub` are imported, so both read it at import (their own offline
    mode), and no module constant is written by rankscope."""
    script = (
        "import os, sys\n"
        "from rankscope.analysis.downstream import settle_hub_mode\n"
        "assert 'datasets' not in sys.modules and 'huggingface_hub' not in sys.modules\n"
        "assert settle_hub_mode(['piqa']) is True\n"
        "assert os.environ['HF_HUB_OFFLINE'] == '1'\n"
        "import datasets.config, huggingface_hub\n"
        "assert datasets.config.HF_HUB_OFFLINE is True and huggingface_hub.is_offline_mode() is True\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "https://127.0.0.1:1"  # port 443 on localhost: refused at once
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_settle_hub_mode_says_when_the_libraries_were_loaded_online(monkeypatch, caplog):
    import huggingface_hub

    _clear_offline_env(monkeypatch)
    monkeypatch.setattr(offline, "_hub_reachable", lambda: False)
    if huggingface_hub.is_offline_mode():
        pytest.skip("huggingface_hub was imported in offline mode in this process")
    with caplog.at_level("WARNING", logger="rankscope.analysis.downstream"):
        assert settle_hub_mode(["piqa"]) is False
    assert "set HF_HUB_OFFLINE=1" in caplog.text
    assert "HF_HUB_OFFLINE" not in os.environ


def test_unknown_task_name_raises_with_suggestion():
    with pytest.raises(DownstreamError, match="rs_word"):
        available_tasks(["rs_wrod"])
