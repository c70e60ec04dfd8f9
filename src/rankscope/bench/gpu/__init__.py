"""`rankscope bench gpu` (also `scripts/gpu_check.sh`): one unattended check of every GPU-only path.

What it runs, in this order, each path on its own (a failure is recorded and the next path runs):

1. train/<method>/<precision>: every method at the 60M preset, bf16-pure and bf16-autocast,
   `steps` steps of the trainer's phases (`bench.train.train_step`: forward + backward,
   clipping, optimizer step, the method's after_step) on random tokens, with each method's
   periodic work (GaLore/Fira refresh, LORO exact step, ReLoRA merge) every `period` steps.
   Measures tokens/s and MFU on the steady steps, and the peak CUDA allocation next to the memory
   table's formula for the same model and optimizer (`account_memory`: bf16 weights + optimizer
   states, what `rankscope methods --memory` prints). Fails on a non-finite loss or weight.
2. infer/<preset>/<dense>-vs-<factorized>: forward latency of the dense model and a factorized
   one (LORO's B·A) at 1B shapes in bf16 on LORO Table 3's grid (batch 64, sequences up to 1024):
   the speedup LORO reports as 2x-4x.
3. landscape/<preset>/<method>: one landscape point (write θ + α·d, evaluate the probe loss)
   against one plain forward over the same probe set (`analysis.pipeline.measure_point_cost`).
4. trainer/<method>/bf16-pure/checkpoint-resume: the real `rankscope.train.train` on the GPU
   (embedded corpus) with a checkpoint half-way and at the end; then, as after a preemption, the
   later checkpoint is removed and the same command resumes from the half-way one to the end.
   Both must finish with a finite validation loss (both are reported; GPU kernels are not
   bit-reproducible, so they are not required to be equal).
5. ddp/<method>/<n>-gpus: `torchrun --nproc_per_node <all visible GPUs> -m rankscope train ...`,
   the DistributedDataParallel path; skipped (not failed) with fewer than two GPUs.
6. train/<method>/bf16-autocast/compiled: `torch.compile` on, for `compile_methods`.

Time, by construction: small fixed work per path (30 steps of a 60M model, a few 1B forwards,
a 12-step run) so that the whole check is estimated at about 3 minutes on one H100/H200-class
GPU (not yet measured on one), compilation last. `budget_s` (285 s) bounds it: a path is started
only while the time it needs (`reserve_s` of its kind, e.g. 60 s for a compilation) is left, and
a path not started counts as failed ("out_of_time"), so a run never silently stops short.

Without CUDA the command checks its arguments, says that there is no CUDA device and exits 0.
`run_gpu_check(config)` is the same body as a function; with `device="cpu"` and tiny shapes it
runs on a CPU (the tests do), every path included.

Output: DIR/gpu_check.json (schema below, `JSON_SCHEMA`) and a short table; the command exits 1
when any path failed or ran out of time, 0 otherwise.

JSON schema "rankscope-gpu-check/1":
    schema, ok (bool: no path failed or ran out of time), counts {ok, failed, skipped, out_of_time},
    device {name, count, capability, total_memory_bytes, peak_bf16_tflops}, environment, settings,
    wall_s, paths: [{path, kind, status (ok | failed | skipped | out_of_time), seconds, error,
    metrics}], the metrics of each kind as listed in `JSON_SCHEMA["metrics"]`.
"""


from rankscope.bench.gpu.config import (
    JSON_SCHEMA,
    LORO_PUBLISHED_SPEEDUP,
    PRECISIONS,
    SCHEMA_NAME,
    STATUSES,
    GpuCheckConfig,
)
from rankscope.bench.gpu.paths import (
    PathResult,
    build_on_device,
    ddp_path,
    infer_path,
    landscape_path,
    train_path,
    trainer_fields,
    trainer_overrides,
    trainer_path,
    trainer_run_args,
)
from rankscope.bench.gpu.runner import (
    PlannedPath,
    device_info,
    execute,
    plan,
    run_gpu_check,
)
from rankscope.bench.gpu.summary import print_summary, summary_line

__all__ = ["JSON_SCHEMA", "LORO_PUBLISHED_SPEEDUP", "PRECISIONS", "SCHEMA_NAME", "STATUSES", "GpuCheckConfig", "PathResult",
           "PlannedPath", "build_on_device", "ddp_path", "device_info", "execute", "infer_path", "landscape_path", "plan",
           "print_summary", "run_gpu_check", "summary_line", "train_path", "trainer_fields", "trainer_overrides",
           "trainer_path", "trainer_run_args"]
