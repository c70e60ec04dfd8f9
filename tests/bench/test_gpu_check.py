"""The GPU check on a machine without CUDA: argument checks, the no-CUDA exit, and the whole body
run on the CPU at tiny shapes through the function API (every path, the JSON schema, the
per-path failure accounting and the time budget)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rankscope.bench import gpu
from rankscope.bench.gpu import JSON_SCHEMA, GpuCheckConfig, run_gpu_check
from rankscope.cli import main
from rankscope.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def tiny_check(**changes) -> GpuCheckConfig:
    settings = dict(
        device="cpu", preset="tiny", methods="full,galore,loro", steps=4, warmup_steps=1, batch_size=2, seq_len=16,
        period=2, compile_methods=("full",), compile_backend="eager", infer_preset="tiny", infer_batch_size=2,
        infer_seq_lens=(8, 16), infer_iters=1, landscape_methods=("loro",), probe_sequences=4, trainer_steps=2,
        ddp_steps=2, ddp_processes=1, model_overrides={"num_layers": 1}, infer_model_overrides={"num_layers": 1},
        budget_s=600.0,
    )
    settings.update(changes)
    return GpuCheckConfig(**settings)


# ---------------------------------------------------------------------------------------------
# without CUDA


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
    (["--device", "cpu"], "--device cuda"),
    (["--warmup-steps", "40"], "warmup-steps"),
])
def test_cli_checks_its_arguments_before_looking_for_cuda(argv, needle, capsys):
    assert main(["bench", "gpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


@no_cuda
def test_the_script_runs_the_check_and_passes_arguments_through():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHON"] = sys.executable
    script = ROOT / "scripts" / "gpu_check.sh"
    done = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
    bad = subprocess.run([str(script), "--methods", "gallore"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "did you mean 'galore'" in bad.stderr


def test_cli_exit_status_follows_the_payload(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for ok, status in ((True, 0), (False, 1)):
        monkeypatch.setattr(gpu, "run_gpu_check", lambda config, out_dir, ok=ok: {"ok": ok})
        assert main(["bench", "gpu", "--budget-s", "10"]) == status


def test_validation_rejects_a_bad_pair_of_inference_methods():
    with pytest.raises(ConfigError, match="pair"):
        tiny_check(infer_methods=("full",)).validate()


# ---------------------------------------------------------------------------------------------
# the body on the CPU


def test_every_path_runs_on_cpu_and_the_json_follows_the_schema(tmp_path):
    payload = run_gpu_check(tiny_check(ddp_processes=2), out_dir=tmp_path, show=False)
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written["ok"] is True and payload["ok"] is True, [p for p in written["paths"] if p["status"] != "ok"]
    assert tuple(k for k in written if k in JSON_SCHEMA["top"]) == JSON_SCHEMA["top"]
    paths = [p["path"] for p in written["paths"]]
    assert paths == ["train/full/bf16-pure", "train/full/bf16-autocast", "train/galore/bf16-pure",
                     "train/galore/bf16-autocast", "train/loro/bf16-pure", "train/loro/bf16-autocast",
                     "infer/tiny/full-vs-loro", "landscape/tiny/loro", "trainer/galore/bf16-pure/checkpoint-resume",
                     "ddp/loro/2-processes", "train/full/bf16-autocast/compiled"]
    assert written["counts"] == {"ok": 11, "failed": 0, "skipped": 0, "out_of_time": 0}
    for result in written["paths"]:
        assert tuple(result) == JSON_SCHEMA["path"]
        assert set(result["metrics"]) == set(JSON_SCHEMA["metrics"][result["kind"]]), result["path"]
        assert result["error"] is None and result["seconds"] > 0
    by_path = {p["path"]: p["metrics"] for p in written["paths"]}
    galore = by_path["train/galore/bf16-pure"]
    # GaLore's refresh really ran every `period` steps while training, and was timed apart.
    assert galore["period_setting"] == "update_proj_gap" and galore["period"] == 2
    assert galore["tokens_per_s"] > 0 and galore["formula_bytes"] > 0 and galore["peak_cuda_bytes"] is None
    assert by_path["train/full/bf16-autocast/compiled"]["compiled"] is True
    # bf16-pure keeps 2-byte weights: what the formula counts (2 bytes per element) plus counters.
    pure, autocast = by_path["train/full/bf16-pure"], by_path["train/full/bf16-autocast"]
    assert pure["weights_and_state_bytes"] < autocast["weights_and_state_bytes"]
    assert pure["formula_bytes"] == autocast["formula_bytes"]
    infer = by_path["infer/tiny/full-vs-loro"]
    assert [p["seq_len"] for p in infer["points"]] == [8, 16] and infer["factorized_params"] < infer["dense_params"]
    assert by_path["ddp/loro/2-processes"]["world_size"] == 2
    trainer = by_path["trainer/galore/bf16-pure/checkpoint-resume"]
    assert trainer["checkpoint_step"] == 1 and trainer["steps"] == 2


def test_a_failing_path_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    real_train_path = gpu.train_path

    def failing_for_galore(config, method, *args):
        if method == "galore":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_train_path(config, method, *args)

    monkeypatch.setattr(gpu.runner, "train_path", failing_for_galore)
    monkeypatch.setattr(gpu.runner, "trainer_path", lambda *a: {"stub": True})  # not under test here
    payload = run_gpu_check(tiny_check(methods="full,galore", compile_methods=(), landscape_methods=()),
                            out_dir=tmp_path, show=False)
    status = {p["path"]: (p["status"], p["error"]) for p in payload["paths"]}
    assert status["train/galore/bf16-pure"] == ("failed", "RuntimeError: CUDA error: an illegal memory access was encountered")
    assert status["train/galore/bf16-autocast"][0] == "failed"
    assert status["train/full/bf16-pure"] == ("ok", None) and status["infer/tiny/full-vs-loro"] == ("ok", None)
    # One process: DDP is not applicable, which is not a failure.
    assert status["ddp/loro/1-processes"][0] == "skipped"
    assert payload["ok"] is False and payload["counts"]["failed"] == 2


def test_paths_that_cannot_start_within_the_budget_count_as_failed(tmp_path):
    payload = run_gpu_check(tiny_check(budget_s=1e-3), out_dir=tmp_path, show=False)
    assert payload["ok"] is False
    statuses = {p["status"] for p in payload["paths"]}
    assert statuses == {"out_of_time", "skipped"}
    assert all("budget" in p["error"] for p in payload["paths"] if p["status"] == "out_of_time")


def test_a_non_finite_loss_fails_the_path(monkeypatch):
    from rankscope.bench import train as bench_train

    real_step = bench_train.train_step

    def exploding(run, batch):
        sample = real_step(run, batch)
        sample["loss"] = torch.tensor(float("nan"))
        return sample

    monkeypatch.setattr(bench_train, "train_step", exploding)
    with pytest.raises(Exception, match="not finite"):
        gpu.train_path(tiny_check(), "full", "bf16-autocast", False, torch.device("cpu"), None)


def test_readme_documents_every_key_of_the_json():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### GPU check"):]
    documented = set(re.findall(r"`([a-z_0-9]+)`", section))
    expected = set(JSON_SCHEMA["top"]) | set(JSON_SCHEMA["path"])
    for keys in JSON_SCHEMA["metrics"].values():
        expected |= set(keys)
    assert expected <= documented, sorted(expected - documented)
    assert gpu.SCHEMA_NAME in section


def test_trainer_path_builds_the_config_rankscope_train_builds_from_the_same_arguments():
    # The trainer path calls rankscope.config.build_config directly (no bench.gpu -> cli import);
    # the DDP path hands trainer_run_args to `rankscope train`. Both must give the same run config.
    from rankscope.cli import build_parser
    from rankscope.cli.train import config_from_args
    from rankscope.config import build_config, config_to_dict

    config = tiny_check(model_overrides={"num_layers": 1})
    argv = gpu.trainer_run_args(config, "galore", 6, "cpu", "fp32", [3, 6], config.batch_size)
    via_cli = config_from_args(build_parser().parse_args(["train", *argv]))
    direct = build_config({}, gpu.trainer_overrides(config, 6, [3, 6]),
                          **gpu.trainer_fields(config, "galore", 6, "cpu", "fp32", config.batch_size))
    assert config_to_dict(via_cli) == config_to_dict(direct)
    assert direct.train.checkpoint_steps == [3, 6] and direct.method.name == "galore"
    # the bench.gpu -> cli -> bench cycle is gone
    assert not any("rankscope.cli" in path.read_text() for path in Path(gpu.__file__).parent.glob("*.py"))
