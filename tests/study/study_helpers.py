"""Small studies and helpers for the study tests (2 CPU cores in CI: a few steps of a 1-layer model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from safetensors.torch import load_file

from rankscope.study import Job, study_from_dict
from rankscope.train import checkpoint as ckpt

ANALYSIS = {"probe_size": 4, "directions": 2, "grid_points": 3, "singular_k_max": 1, "singular_ks": [1],
            "singular_unweighted": False, "metrics": ["landscape", "interpolation", "spectral", "similarity"]}


def small_study_dict(methods=("full", "lowrank"), seeds=(0, 1), steps=6, checkpoint_steps=(3, 6), slower=False,
                     controls=(), **extra) -> dict:
    """`slower`: the helpers.TINY_RUN shapes (2 layers, 64 tokens, 8 sequences), for tests that must
    catch a run while it trains. No control unless asked (a study's default is [frozen]): the tests
    of other mechanisms train fewer runs."""
    layers, seq_len, batch = (2, 64, 8) if slower else (1, 32, 4)
    spec = {
        "name": "small",
        "grid": {"methods": list(methods), "presets": ["tiny"], "seeds": list(seeds)},
        "base": {"model": {"overrides": {"num_layers": layers}},
                 "data": {"seq_len": seq_len, "val_sequences": 8, "probe_sequences": 4},
                 "train": {"steps": steps, "batch_size": batch, "eval_every": 0, "log_every": 1,
                           "checkpoint_steps": list(checkpoint_steps)}},
        "analysis": dict(ANALYSIS),
        "eval": {"tasks": ["rs_word"], "limit": 4},
        "controls": list(controls),
    }
    spec.update(extra)
    return spec


def small_study(**kwargs):
    return study_from_dict(small_study_dict(**kwargs))


def write_study(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def checkpoint_weights(info: ckpt.CheckpointInfo) -> dict:
    return load_file(str(info.path / "model.safetensors"))


def final_weights(run_dir: Path) -> dict:
    return checkpoint_weights(ckpt.list_checkpoints(run_dir)[-1])


def read_outcome(study_dir: Path, stage: str, name: str) -> dict | None:
    try:
        return json.loads((study_dir / "jobs" / stage / f"{name}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def wait_for(condition, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return max(steps, default=0)


def start_driver(args: list[str]) -> subprocess.Popen:
    """`rankscope study ...` in its own process group (so a test can stop it like a terminal would)."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    # Ctrl-C must reach the driver even when the test suite itself runs as a background job of a
    # non-interactive shell (`... &`), which starts it with SIGINT ignored, an ignore its children inherit.
    return subprocess.Popen([sys.executable, "-m", "rankscope", "study", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def write_corpus(path: Path, documents: int = 200) -> Path:
    """A small .txt corpus (documents separated by blank lines) that tokenizes in a second."""
    words = ["river", "stone", "light", "moves", "under", "quiet", "the", "a", "green", "hill", "falls", "over",
             "morning", "wind", "old", "bridge", "slowly", "bright", "water", "sings"]
    docs = [" ".join(words[(d * 7 + i * 3 + i * i) % len(words)] for i in range(40 + d % 13)) + "."
            for d in range(documents)]
    path.write_text("\n\n\n".join(docs) + "\n")
    return path


def small_text_study(corpus: Path, seq_len: int = 16, **kwargs):
    """small_study on `corpus` with a 300-token BPE: a fresh token cache is filled in about a second."""
    spec = small_study_dict(**kwargs)
    spec["base"]["data"].update({"source": str(corpus), "vocab_size": 300, "seq_len": seq_len, "val_sequences": 4,
                                 "probe_sequences": 2})
    return study_from_dict(spec)


@dataclass(frozen=True, kw_only=True)
class EnvironmentJob(Job):
    """A job that records the value of each of `names` in the environment of the process running it."""

    names: tuple[str, ...]

    def run(self) -> dict:
        return {name: os.environ.get(name) for name in self.names}

    def finished_on_disk(self) -> bool:
        return False
