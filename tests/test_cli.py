"""The command line: help, and bad input that must give one clear error line and exit 2."""

import json
import os
import subprocess
import sys

import pytest

from rankscope.cli import main

TINY = ["--preset", "tiny", "--set", "model.overrides={num_layers: 1}", "--seq-len", "32", "--batch-size", "4",
        "--set", "data.val_sequences=8", "--set", "data.probe_sequences=4", "--eval-every", "0"]


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    assert err[0].startswith("error: ")
    return err[0]


@pytest.mark.parametrize("command", ["train", "export", "methods", "analyze", "eval", "study", "report", "bench", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: rankscope " + command in capsys.readouterr().out


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "rankscope", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "rankscope" in done.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "tinny", "--steps", "1"], "unknown (model )?preset 'tinny'.*did you mean 'tiny'"),
        (["train", *TINY, "--method", "galor"], "unknown method 'galor'.*did you mean 'galore'"),
        (["train", *TINY, "--set", "train.stpes=3"], "unknown config key 'train.stpes'.*'train.steps'"),
        (["train", *TINY, "--data", "/nonexistent/corpus.jsonl", "--steps", "1"], "/nonexistent/corpus.jsonl"),
        (["train", *TINY, "--seq-len", "100000", "--steps", "1"], "seq_len|sequences"),
        (["train", *TINY, "--set", "model.overrides={num_layers: 1, vocab_size: 100}", "--steps", "1"], "vocab"),
        (["train", *TINY, "--steps", "2", "--checkpoint-steps", "5"], "checkpoint_steps"),
        (["export", "/nonexistent/run", "--out", "/tmp/x"], "not a rankscope run"),
    ],
)
def test_bad_input_gives_one_clear_error_line(argv, message, capsys, tmp_path):
    if argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    import re

    assert re.search(message, _error_line(capsys))


def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning_and_kept(tmp_path, capsys, caplog):
    straight, run = tmp_path / "straight", tmp_path / "run"
    argv = ["train", *TINY, "--steps", "4", "--checkpoint-steps", "2"]
    assert main([*argv, "--out", str(straight)]) == 0
    assert main([*argv, "--out", str(run)]) == 0
    # A truncated weights file of the latest checkpoint: the resume must not use it.
    (run / "summary.json").unlink()
    weights = run / "checkpoints" / "step_000004" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    damaged = weights.read_bytes()
    assert main([*argv, "--out", str(run)]) == 0
    assert "checkpoints/step_000004 is damaged" in caplog.text
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == 2
    kept = list((run / "checkpoints").glob("step_000004.damaged-*"))
    assert len(kept) == 1 and (kept[0] / "model.safetensors").read_bytes() == damaged  # nothing destroyed
    final = "checkpoints/step_000004/model.safetensors"
    assert (run / final).read_bytes() == (straight / final).read_bytes()  # resumed bit for bit


def test_train_then_export_round_trip(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "3", "--out", str(run)]) == 0
    assert "val ppl" in capsys.readouterr().out
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    import torch
    from transformers import AutoModelForCausalLM

    from rankscope.train import load_run_model

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_run_model(run).model
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert ((a - b).norm() / a.norm()).item() < 1e-4
