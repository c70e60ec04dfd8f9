"""Bad input on every subcommand: one `error:` line naming the problem, exit status 2, and no file
that existed before the command is changed or lost.

One table, one row per bad input. To cover a new option, add a row: the command line (with
`{tmp}` for the test's folder and `{run}` for a copy of a trained run), a regex the error line
must match, and optionally a `setup` that prepares files, environment or a working directory.
Every row also checks that every file present before the command is still there, byte for byte,
and (unless the row says otherwise) that the command created nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rankscope.cli import main

TINY = ["--preset", "tiny", "--set", "model.overrides={num_layers: 1}", "--seq-len", "32", "--batch-size", "4",
        "--set", "data.val_sequences=8", "--set", "data.probe_sequences=4", "--eval-every", "0",
        "--steps", "2", "--checkpoint-steps", "1"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished tiny run (checkpoints at steps 1 and 2) that rows copy and damage."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    return run


@dataclass
class Context:
    tmp: Path
    trained: Path
    monkeypatch: pytest.MonkeyPatch
    lock_holder: Callable
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)

    def copy_run(self, name: str = "run") -> Path:
        target = self.tmp / name
        shutil.copytree(self.trained, target)
        return target


@dataclass
class Case:
    id: str
    argv: list[str]
    message: str  # regex; <tmp> stands for the test's folder, <key> for ctx.values[key] set by the setup
    setup: Callable[[Context], None] | None = None
    creates_nothing: bool = True


# -- setups ------------------------------------------------------------------------------------


def _write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def parent_of_runs(ctx: Context) -> None:  # issue case 1: a forgotten run name
    ctx.copy_run("runs/full-tiny-s0")
    ctx.copy_run("runs/galore-tiny-s0")
    _write(ctx.tmp / "runs" / "notes.md", "which run was best\n")


def run_holding_a_run(ctx: Context) -> None:
    ctx.copy_run("run")
    ctx.copy_run("run/old/full-tiny-s0")


def project_folder(ctx: Context) -> None:  # issue case 2: `--out .` in a project folder
    project = ctx.tmp / "project"
    _write(project / "config.yaml", "train: {steps: 2}\n")  # a valid rankscope config, not a run
    _write(project / "src" / "notes.txt", "my notes\n")
    ctx.monkeypatch.chdir(project)


def run_copy(ctx: Context) -> None:
    ctx.copy_run()


def run_without_config_file(ctx: Context) -> None:  # issue case 5
    (ctx.copy_run() / "config.yaml").unlink()


def damaged(name: str, data: bytes) -> Callable[[Context], None]:
    def setup(ctx: Context) -> None:
        run = ctx.copy_run()
        _write(run / name, data)
        if name != "summary.json":
            (run / "summary.json").unlink()  # so that the run resumes rather than being complete

    return setup


def locked_run(ctx: Context) -> None:  # issue case 6: a second process on the same --out
    run = ctx.copy_run()
    (run / "summary.json").unlink()
    ctx.values["pid"] = str(ctx.lock_holder(run).pid)


def non_utf8_config(ctx: Context) -> None:
    _write(ctx.tmp / "latin1.yaml", "# r\xe9sum\xe9 of the run\ntrain: {steps: 2}\n".encode("latin-1"))


def method_as_string(ctx: Context) -> None:
    _write(ctx.tmp / "method.yaml", "method: galore\ntrain: {steps: 2}\n")


def a_file(ctx: Context) -> None:
    _write(ctx.tmp / "a-file", "not a folder\n")


def read_only_folder(ctx: Context) -> None:
    folder = ctx.tmp / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    ctx.cleanups.append(lambda: folder.chmod(0o755))
    if os.geteuid() == 0:  # root ignores permission bits: use a folder the kernel refuses writes in
        pytest.skip("running as root: permission bits do not make a folder read-only (see test_read_only_folder_as_root)")


def cache_is_a_file(ctx: Context) -> None:
    a_file(ctx)
    ctx.monkeypatch.setenv("RANKSCOPE_CACHE", str(ctx.tmp / "a-file"))


def study_with_task_typo(ctx: Context) -> None:
    _write(ctx.tmp / "study.yaml", "grid: {methods: [full], presets: [tiny], seeds: [0]}\n"
           "base: {train: {steps: 2}}\neval: {tasks: [rankscope_locl]}\n")


def study_with_method_string(ctx: Context) -> None:
    _write(ctx.tmp / "study.yaml", "grid: {methods: [full], presets: [tiny], seeds: [0]}\nbase: {method: galore}\n")


def non_empty_folder(ctx: Context) -> None:
    _write(ctx.tmp / "earlier-export" / "config.json", "{}")


# -- the table -----------------------------------------------------------------------------------

TRAIN_OUT = ["train", *TINY, "--out"]

CASES = [
    # data loss (issue cases 1-3): refused, every file kept
    Case("train --overwrite a folder of runs", [*TRAIN_OUT, "{tmp}/runs", "--overwrite"],
         r"<tmp>/runs is not a run folder but holds runs \(full-tiny-s0, galore-tiny-s0\); name the run folder itself",
         parent_of_runs),
    Case("train --overwrite a run that holds a run", [*TRAIN_OUT, "{tmp}/run", "--overwrite", "--lr", "0.002"],
         r"--out <tmp>/run holds other runs \(old/full-tiny-s0\); --overwrite replaces one run", run_holding_a_run),
    Case("train --overwrite --out . in a project", [*TRAIN_OUT, ".", "--overwrite", "--config", "config.yaml"],
         r"--out \. is not empty and is not a rankscope run folder.*choose a new or empty --out", project_folder),
    Case("export into a checkpoint", ["export", "{tmp}/run", "--out", "{tmp}/run/checkpoints/step_000002"],
         r"lies inside the checkpoint folder <tmp>/run/checkpoints/step_000002", run_copy),
    Case("export into checkpoints/", ["export", "{tmp}/run", "--out", "{tmp}/run/checkpoints/hf"],
         r"lies inside the checkpoint folder <tmp>/run/checkpoints;", run_copy),
    Case("train --out inside a run", [*TRAIN_OUT, "{tmp}/run/inner"], r"lies inside the run folder <tmp>/run", run_copy),
    # a checkpoint resumes only under its own config (issue case 5), one writer per run (case 6)
    Case("train a changed config", [*TRAIN_OUT, "{tmp}/run", "--lr", "0.002"],
         r"holds a run of a different config \(optim.lr: None in checkpoint step_000002 vs 0.002 now\); pass --overwrite",
         run_without_config_file),
    Case("train where another process trains", [*TRAIN_OUT, "{tmp}/run"],
         r"run folder <tmp>/run is in use by process <pid> on .*wait for it to finish", locked_run),
    # crash artifacts that are not a cut-off last line (issue case 7)
    Case("damaged metrics line", [*TRAIN_OUT, "{tmp}/run"], r"metrics.jsonl line 2 is damaged.*delete that line",
         damaged("metrics.jsonl", b'{"step": 0, "val_loss": 8.9}\n{"ste\x00\x00\n{"step": 2, "loss": 8.5}\n')),
    Case("damaged initial_eval.json", [*TRAIN_OUT, "{tmp}/run"], r"initial_eval.json is damaged \(JSONDecodeError\); delete it",
         damaged("initial_eval.json", b'{"loss": 8.9, "pp')),
    Case("damaged summary.json", [*TRAIN_OUT, "{tmp}/run"], r"summary.json is damaged \(JSONDecodeError\); delete it and re-run",
         damaged("summary.json", b"\x00" * 40)),
    # config values (issue: tracebacks and silently accepted values)
    Case("non-UTF-8 config", [*TRAIN_OUT, "{tmp}/r", "--config", "{tmp}/latin1.yaml"],
         r"latin1.yaml' is not UTF-8 text \(byte 0xe9 at offset 3\); save it as UTF-8", non_utf8_config),
    Case("method as a string", ["train", "--config", "{tmp}/method.yaml", "--out", "{tmp}/r"],
         r"'method' must be a mapping.*`method: \{name: galore\}`", method_as_string),
    Case("optim.lr=nan", [*TRAIN_OUT, "{tmp}/r", "--set", "optim.lr=nan"], r"optim.lr must be a positive number, got nan"),
    Case("--lr inf", [*TRAIN_OUT, "{tmp}/r", "--lr", "inf"], r"optim.lr must be a positive number, got inf"),
    Case("optim.weight_decay=-1", [*TRAIN_OUT, "{tmp}/r", "--set", "optim.weight_decay=-1"], r"optim.weight_decay must be a number >= 0, got -1"),
    Case("optim.grad_clip=-1", [*TRAIN_OUT, "{tmp}/r", "--set", "optim.grad_clip=-1"], r"optim.grad_clip must be a number >= 0 \(0 turns clipping off\)"),
    Case("optim.eps=0", [*TRAIN_OUT, "{tmp}/r", "--set", "optim.eps=0"], r"optim.eps must be a positive number, got 0"),
    Case("data.max_train_tokens=-5", [*TRAIN_OUT, "{tmp}/r", "--set", "data.max_train_tokens=-5"], r"data.max_train_tokens must be >= 0, got -5"),
    Case("model override of 0 layers", [*TRAIN_OUT, "{tmp}/r", "--set", "model.overrides={num_layers: 0}"],
         r"model.overrides.num_layers must be a positive number, got 0"),
    Case("sequence longer than the model's", [*TRAIN_OUT, "{tmp}/r", "--set", "model.overrides={num_layers: 1, max_seq_len: 16}"],
         r"data.seq_len 32 is longer than the model's max_seq_len 16 \(preset tiny\); set model.overrides.max_seq_len=32 or a data.seq_len of at most 16"),
    Case("train --device tpu", [*TRAIN_OUT, "{tmp}/r", "--device", "tpu"], r"unknown device 'tpu'; use auto, cpu, cuda or cuda:N"),
    Case("unknown preset", [*TRAIN_OUT, "{tmp}/r", "--preset", "tinny"], r"unknown (model )?preset 'tinny'.*did you mean 'tiny'"),
    Case("unknown method", [*TRAIN_OUT, "{tmp}/r", "--method", "galor"], r"unknown method 'galor'.*did you mean 'galore'"),
    Case("unknown config key", [*TRAIN_OUT, "{tmp}/r", "--set", "train.stpes=3"], r"unknown config key 'train.stpes'.*'train.steps'"),
    Case("checkpoint step past the end", [*TRAIN_OUT, "{tmp}/r", "--checkpoint-steps", "5"], r"checkpoint_steps"),
    # where output goes
    Case("train --out a file", [*TRAIN_OUT, "{tmp}/a-file"], r"--out <tmp>/a-file is a file, not a folder", a_file),
    Case("train --out under a file", [*TRAIN_OUT, "{tmp}/a-file/run"], r"--out <tmp>/a-file/run lies under <tmp>/a-file, which is a file", a_file),
    Case("train --out in a read-only folder", [*TRAIN_OUT, "{tmp}/read-only/run"],
         r"--out <tmp>/read-only/run cannot be written \(in <tmp>/read-only\)", read_only_folder),
    Case("RANKSCOPE_CACHE a file", [*TRAIN_OUT, "{tmp}/r"], r"RANKSCOPE_CACHE <tmp>/a-file is a file, not a folder", cache_is_a_file),
    Case("export --out an existing file", ["export", "{run}", "--out", "{tmp}/a-file"],
         r"export --out <tmp>/a-file is a file, not a folder", a_file),
    Case("export --out a folder with files", ["export", "{run}", "--out", "{tmp}/earlier-export"],
         r"export --out <tmp>/earlier-export already holds files; export to a new or empty folder", non_empty_folder),
    Case("export a folder that is no run", ["export", "{tmp}/nothing", "--out", "{tmp}/hf"], r"not a rankscope run"),
    Case("study --out a file", ["study", "{tmp}/study.yaml", "--out", "{tmp}/a-file"], r"--out <tmp>/a-file is a file", a_file),
    Case("demo --out a file", ["demo", "--out", "{tmp}/a-file"], r"--out <tmp>/a-file is a file", a_file),
    Case("bench --out a file", ["bench", "train", "--out", "{tmp}/a-file"], r"--out <tmp>/a-file is a file", a_file),
    # eval options, checked before the model is loaded
    Case("analyze --baseline-references the reference", ["analyze", "{run}", "--reference", "{run}", "--baseline-references", "{run}"],
         r"baseline reference run is the reference itself; pass the full-rank runs of the other seeds as --baseline-references"),
    Case("eval --device tpu", ["eval", "{run}", "--device", "tpu", "--tasks", "rankscope_local"], r"--device: unknown device 'tpu'"),
    Case("eval --limit -1", ["eval", "{run}", "--limit", "-1"], r"--limit takes the number of items per task \(0 = all\), got -1"),
    Case("eval --batch-size 0", ["eval", "{run}", "--batch-size", "0"], r"--batch-size must be at least 1, got 0"),
    Case("eval unknown task", ["eval", "{run}", "--tasks", "rs_clozee"], r"unknown local task 'rs_clozee'.*did you mean 'rs_cloze'"),
    # studies validate every stage's settings before training anything
    Case("study base.method a string", ["study", "{tmp}/study.yaml", "--out", "{tmp}/study"],
         r"base\.method must be a mapping, got 'galore'.*method: \{rank: 64\}", study_with_method_string),
    Case("study eval.tasks typo", ["study", "{tmp}/study.yaml", "--out", "{tmp}/study"],
         r"unknown local task 'rankscope_locl'.*did you mean 'rankscope_local'", study_with_task_typo),
    Case("--threads 0", ["--threads", "0", "methods"], r"--threads must be at least 1, got 0"),
]


def _snapshot(root: Path) -> dict[str, bytes]:
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if not path.is_symlink():
                files[str(path.relative_to(root))] = path.read_bytes()
    return files


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_error_line_and_keeps_every_file(case, tmp_path, trained_run, monkeypatch, capsys, lock_holder):
    ctx = Context(tmp_path, trained_run, monkeypatch, lock_holder)
    try:
        if case.setup:
            case.setup(ctx)
        before = _snapshot(tmp_path)
        argv = [arg.replace("{tmp}", str(tmp_path)).replace("{run}", str(trained_run)) for arg in case.argv]
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        after = _snapshot(tmp_path)
    finally:
        for cleanup in ctx.cleanups:
            cleanup()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err  # one line, no traceback
    pattern = case.message.replace("<tmp>", re.escape(str(tmp_path)))
    for key, value in ctx.values.items():
        pattern = pattern.replace(f"<{key}>", re.escape(value))
    assert re.search(pattern, err[0]), err[0]
    for name, data in before.items():
        assert after.get(name) == data, f"{name} was changed or removed"
    if case.creates_nothing:
        assert sorted(after) == sorted(before), set(after) - set(before)


def test_read_only_folder_as_root(tmp_path, monkeypatch, capsys):
    """As root, permission bits do not stop writes; a folder on which the kernel refuses them does."""
    if os.geteuid() != 0:
        pytest.skip("covered by the table's read-only row")
    candidates = [Path("/sys/kernel"), Path("/proc/self")]
    folder = next((c for c in candidates if c.is_dir() and not _can_create_in(c)), None)
    if folder is None:
        pytest.skip("no folder here refuses root's writes")
    assert main([*TRAIN_OUT, str(folder / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {folder}/run cannot be written (in {folder})" in err[0], err


def _can_create_in(folder: Path) -> bool:
    try:
        (folder / f".probe-{time.monotonic_ns()}").open("x").close()
    except OSError:
        return False
    return True
