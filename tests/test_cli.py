"""The command line: help, and bad input that must give one clear error line and exit 2."""

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from rankscope.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--preset", "tiny", "--set", "model.overrides={num_layers: 1}", "--seq-len", "32", "--batch-size", "4",
        "--set", "data.val_sequences=8", "--set", "data.probe_sequences=4", "--eval-every", "0"]


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    assert err[0].startswith("error: ")
    return err[0]


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and sub-command of the parser, e.g. ("train",), ("bench", "gpu")."""
    paths = []
    for action in parser.populate()._actions:  # populate: a command's options are added on first use
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append((*prefix, name))
                paths.extend(_command_paths(sub, (*prefix, name)))
    return paths


COMMAND_PATHS = _command_paths(build_parser())


def test_the_command_tree_has_every_command():
    tops = {path[0] for path in COMMAND_PATHS}
    assert tops >= {"train", "export", "methods", "config", "analyze", "eval", "study", "report", "bench", "demo",
                    "scaling"}
    assert {("bench", name) for name in ("train", "infer", "optimizer", "analysis", "all", "gpu")} <= set(COMMAND_PATHS)
    assert {("scaling", "run"), ("scaling", "fit"), ("config", "keys")} <= set(COMMAND_PATHS)


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=" ".join)
def test_every_command_has_help(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    assert "usage: rankscope " + " ".join(path) in capsys.readouterr().out


def test_help_of_every_command_imports_no_torch():
    code = f"""
import contextlib, io, sys
from rankscope.cli import build_parser
for path in [[]] + {[list(p) for p in COMMAND_PATHS]!r}:
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        build_parser().parse_args([*path, "--help"])
print(sorted(m for m in ("torch", "transformers", "lm_eval") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_help_works_where_the_source_files_cannot_be_read():
    # The help reads defaults from rankscope's .py files; without them it loses the defaults, not the help.
    code = f"""
import contextlib, io
from pathlib import Path
import rankscope.cli._fields as fields
fields._module_path = lambda module: Path("/nonexistent/x.py")
from rankscope.cli import build_parser, main
for path in [[]] + {[list(p) for p in COMMAND_PATHS]!r}:
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        build_parser().parse_args([*path, "--help"])
args = build_parser().parse_args(["analyze", "run", "--reference", "full", "--directions", "3"])
print(args.directions, main(["config", "keys", "--analysis"]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("3 0")


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"rankscope {version('rankscope')}"


def _doc_command_lines():
    """(file, line number, command) for every line of a README/docs code block that runs rankscope."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        in_block, pending = False, ""
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip().startswith("```"):
                in_block, pending = not in_block, ""
                continue
            if not in_block:
                continue
            text = (pending + " " + line.strip()).strip()
            if text.endswith("\\"):
                pending = text[:-1]
                continue
            pending = ""
            match = re.match(r"^(?:\$ )?(?:-m |.* -m )?(rankscope .*)", text)
            if match:
                yield path.relative_to(ROOT), number, re.split(r"\s+#", match.group(1))[0].strip()


DOC_LINES = list(_doc_command_lines())


def test_the_docs_have_command_lines_to_check():
    assert len(DOC_LINES) >= 15


@pytest.mark.parametrize("where, number, command", DOC_LINES, ids=[f"{w}:{n}" for w, n, _ in DOC_LINES])
def test_every_command_line_in_the_docs_parses(where, number, command):
    # Skipped: README's pipeline overview (`rankscope train    → runs/<run>/ ...`), which shows what
    # each command writes, not a command line; and a line that ends in "..." (more arguments elided).
    if "→" in command or command.endswith("..."):
        pytest.skip("not a complete command line")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(shlex.split(command)[1:])
        except SystemExit as exc:
            assert exc.code == 0, f"{where}:{number}: {command}: {err.getvalue()}"


def test_examples_in_the_main_help_parse():
    from rankscope.cli import EPILOG

    commands = [line.split("   ")[0].strip() for line in EPILOG.splitlines() if line.strip().startswith("rankscope ")]
    assert len(commands) >= 5
    for command in commands:
        build_parser().parse_args(shlex.split(command)[1:])


@pytest.mark.parametrize("path", [("train",), ("methods",), ("bench", "train"), ("bench", "gpu")], ids=" ".join)
def test_preset_help_lists_every_preset(path, capsys):
    from rankscope.models.presets import PRESETS

    with pytest.raises(SystemExit):
        main([*path, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    listed = re.search(r"--preset PRESET (.*?)\(default", text).group(1)
    assert [name.strip() for name in listed.split(":")[-1].split(",")] == list(PRESETS)


def test_config_keys_lists_every_run_config_key_with_type_and_default(capsys):
    from rankscope.config import RunConfig

    assert main(["config", "keys"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line and not line.startswith("method.*")}
    assert re.match(r"optim\.lr\s+float \| None\s+None\s+peak learning rate", rows["optim.lr"])
    assert re.match(r"train\.steps\s+int\s+300\s+optimizer steps", rows["train.steps"])
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(section.default_factory()):
            if (section.name, f.name) != ("method", "settings"):
                assert f"{section.name}.{f.name}" in rows


def test_config_keys_of_a_method_and_of_analysis(capsys):
    assert main(["config", "keys", "--method", "galore"]) == 0
    assert re.search(r"^method\.rank\s+int\s+", capsys.readouterr().out, re.MULTILINE)
    assert main(["config", "keys", "--analysis"]) == 0
    assert re.search(r"^hessian_samples\s+int\s+10\s", capsys.readouterr().out, re.MULTILINE)


def test_what_the_help_reads_from_the_source_matches_the_imported_dataclasses():
    from rankscope import config
    from rankscope.analysis.downstream import DEFAULT_TASKS, HUB_TASKS
    from rankscope.analysis.settings import CHOICES, FAMILIES, AnalysisSettings
    from rankscope.cli._common import RUN_CONFIG_SECTIONS, launchers, presets
    from rankscope.cli._fields import dataclass_fields, module_constant
    from rankscope.models.presets import PRESETS
    from rankscope.scaling.fit import FitSettings
    from rankscope.study import LAUNCHERS, STAGES
    from rankscope.study.spec import EvalSpec

    classes = [(AnalysisSettings, "rankscope.analysis.settings"), (FitSettings, "rankscope.scaling.fit"),
               (EvalSpec, "rankscope.study.spec")]
    classes += [(getattr(config, name), "rankscope.config") for name in RUN_CONFIG_SECTIONS.values()]
    for cls, module in classes:
        read = dataclass_fields(module, cls.__name__)
        instance = cls()
        assert list(read) == [f.name for f in dataclasses.fields(cls)]
        for f in dataclasses.fields(cls):
            if f.name in ("settings", "tasks"):  # set later / a lambda factory: not shown as a default
                continue
            assert read[f.name].default == getattr(instance, f.name), (cls.__name__, f.name)
    assert presets() == tuple(PRESETS) and launchers() == LAUNCHERS
    assert module_constant("rankscope.study.spec", "STAGES") == STAGES
    assert module_constant("rankscope.analysis.settings", "FAMILIES") == FAMILIES
    assert module_constant("rankscope.analysis.settings", "CHOICES") == CHOICES
    assert module_constant("rankscope.analysis.downstream.tasks", "DEFAULT_TASKS") == DEFAULT_TASKS == EvalSpec().tasks
    assert module_constant("rankscope.analysis.downstream.tasks", "HUB_TASKS") == HUB_TASKS


def test_train_flags_default_to_the_config_dataclasses():
    from rankscope.cli.train import config_from_args
    from rankscope.config import build_config, config_to_dict

    args = build_parser().parse_args(["train"])
    assert all(getattr(args, name) is None for name in vars(args) if "__" in name)
    assert config_to_dict(config_from_args(args)) == config_to_dict(build_config({}))
    args = build_parser().parse_args(["train", "--steps", "7", "--lr", "0.01", "--checkpoint-steps", "3,7"])
    cfg = config_from_args(args)
    assert (cfg.train.steps, cfg.optim.lr, cfg.train.checkpoint_steps) == (7, 0.01, [3, 7])


def test_analyze_options_default_to_the_analysis_settings(monkeypatch):
    from rankscope.analysis import pipeline
    from rankscope.analysis.settings import AnalysisSettings

    seen = []
    monkeypatch.setattr(pipeline, "analyze_runs", lambda runs, reference, settings, **kw: seen.append(settings) or {})
    assert main(["analyze", "run", "--reference", "full"]) == 0
    assert seen[-1] == AnalysisSettings()
    assert main(["analyze", "run", "--reference", "full", "--steps", "2,4", "--directions", "3", "--no-mask-padding",
                 "--scope", "both", "--set", "batch_size=8"]) == 0
    assert (seen[-1].steps, seen[-1].directions, seen[-1].mask_padding, seen[-1].scopes, seen[-1].batch_size) == (
        (2, 4), 3, False, ("all", "blocks"), 8)
    assert main(["analyze", "run", "--reference", "full", "--checkpoint-steps", "6"]) == 0
    assert seen[-1].steps == (6,)


def test_threads_is_accepted_before_and_after_every_command():
    for command in (["train"], ["study", "s.yaml"], ["bench", "train"], ["scaling", "fit", "t.csv"]):
        assert build_parser().parse_args([*command, "--threads", "2"]).threads == 2
        assert build_parser().parse_args(["--threads", "3", *command]).threads == 3


def test_bench_all_takes_the_options_every_benchmark_shares():
    args = build_parser().parse_args(["bench", "all", "--preset", "tiny", "--device", "cpu", "--seed", "1", "--model",
                                      "num_layers=1", "--methods", "full", "--repeats", "1", "--out", "b"])
    assert (args.preset, args.device, args.seed, args.model_overrides, args.methods, args.repeats) == (
        "tiny", "cpu", 1, ["num_layers=1"], "full", 1)


def test_scaling_spec_alone_still_means_scaling_run():
    args = build_parser().parse_args(["scaling", "spec.yaml", "--out", "x"])
    assert (args.scaling_command, args.spec, args.out) == ("run", "spec.yaml", "x")
    args = build_parser().parse_args(["scaling", "run", "spec.yaml"])
    assert (args.scaling_command, args.spec) == ("run", "spec.yaml")


# ---------------------------------------------------------------------------------------------
# Exit status when runs fail: 1 with a one-line summary, 0 with --allow-failures.

FAILED = {"failed": ["lowrank-tiny-s0"], "runs": ["full-tiny-s0", "lowrank-tiny-s0"]}


def _fake_study(monkeypatch, tmp_path):
    import rankscope.study

    monkeypatch.setattr(rankscope.study, "run_study", lambda *a, **kw: {**FAILED, "out": str(tmp_path / "s")})
    return ["study", "study.yaml", "--out", str(tmp_path / "s"), "--stage", "train"]


def _fake_demo(monkeypatch, tmp_path):
    import rankscope.demo
    import rankscope.report.tables

    monkeypatch.setattr(rankscope.demo, "run_demo", lambda *a, **kw: {**FAILED, "out": str(tmp_path / "d"),
                                                                    "wall_time": 60.0})
    monkeypatch.setattr(rankscope.report.tables, "print_results_table", lambda out: None)
    return ["demo", "--quick", "--out", str(tmp_path / "d")]


def _fake_scaling(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import rankscope.scaling.runner
    from rankscope.scaling.fit import FitSettings

    monkeypatch.setattr(rankscope.scaling.runner, "load_spec", lambda path: SimpleNamespace(fit=FitSettings()))
    monkeypatch.setattr(rankscope.scaling.runner, "run_scaling", lambda *a, **kw: {
        **FAILED, "out": str(tmp_path / "c"), "fits": {}, "compute_optimal": {}})
    return ["scaling", "spec.yaml", "--out", str(tmp_path / "c")]


@pytest.mark.parametrize("fake", [_fake_study, _fake_demo, _fake_scaling], ids=["study", "demo", "scaling"])
def test_a_failed_run_gives_exit_status_1_unless_allow_failures(fake, monkeypatch, tmp_path, capsys):
    argv = fake(monkeypatch, tmp_path)
    assert main(argv) == 1
    summary = [line for line in capsys.readouterr().out.splitlines() if "runs failed" in line]
    assert len(summary) == 1 and "lowrank-tiny-s0" in summary[0]
    assert main([*argv, "--allow-failures"]) == 0


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "rankscope", "--help"], capture_output=True, text=True, timeout=120,
                          check=False)
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
