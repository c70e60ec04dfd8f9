"""`rankscope bench optimizer`: GaLore / Fira steps next to their floor, torch AdamW and the
reference packages; the randomized projector refresh against the exact SVD; LORO's exact step
against a dense SVD retraction (`loro_step.py`).

Part 1, the steps. The weights are the preset's targeted projections (q, k, v, o, gate, up, down
of every block) plus the blocks' RMSNorm weights (what GaLore / Fira leave unprojected and step
with plain AdamW); the rank is the methods' rank for the preset. The gradients are identical for
every implementation and have a decaying spectrum (singular values ∝ 1/i, RMS 1e-3), as LLM
gradients do; it matters for the refresh quality below, not for the cost of a step.
- full: `torch.optim.AdamW(foreach=True)` on every tensor (the dense baseline);
- galore / fira: ours, stacking same-shaped matrices as the optimizer chooses for the device;
  galore-stacked / galore-per-matrix (and fira-...): the other choice, for comparison;
  galore-rsvd: ours with the randomized refresh (`svd="randomized"`);
  golore: GoLoreAdamW in its random phase (a Haar draw instead of the gradient's SVD at a refresh);
- spam / stable-spam: the dense SPAM and Stable-SPAM optimizers on the same tensors (no floor);
- galore-ref / fira-ref: `galore_torch.GaLoreAdamW` / `fira.FiraAdamW`.
Steady steps use a projector gap longer than the run; refresh steps use gap 1 (an SVD every
step); the refresh's extra cost is amortized at the method's gap T (200 in GaLore / Fira).

The floor of a projected step is the arithmetic it cannot avoid, each part timed alone on the
same shapes:
- adam: `torch.optim.AdamW(foreach=True)` on the tensors Adam updates: the unprojected
  parameters and one tensor of each projected gradient's low-rank shape (m x r or r x n);
- matmul: the projection of every gradient (G·Pᵀ or Pᵀ·G, into a preallocated output) and its
  back-projection accumulated into the weight (W += N·P, one GEMM with accumulation); GaLore
  back-projects once, Fira twice (its residual needs back(R) as well as the update back(N)).
  On CUDA each is timed per matrix and as one batched matmul per shape, and the faster counts.
floor = adam + matmul; step / floor is the cost of everything else (elementwise passes over
full-size tensors, allocation, Python). Fira also has full-size elementwise work no
implementation avoids: forming its residual S = G·phi, taking ||S|| for the limiter and adding S
to the weight, three passes over every matrix; they are timed alone too ("residual"), and Fira's
step is also given over floor + residual.

Part 2, the randomized refresh. For each distinct (shape, side): the exact SVD (the reference's
refresh) and `torch.svd_lowrank` with r + oversample columns and niter subspace iterations,
timed, and the subspaces they give compared over every matrix of that shape: the distance
||P Pᵀ − Q Qᵀ||_F / sqrt(2r) (0: the same subspace, 1: orthogonal) and the gradient energy the
randomized projector keeps relative to the exact one (1: as much).

Every timing is the median of `steps` consecutive calls; the implementations take turns
(`run_alternating`) for `repeats` rounds; records give the median and the minimum over rounds
of the wall time and, on the CPU, the median of the process CPU time. On a busy shared machine
the wall time includes waiting for a core; the CPU time (with one thread) does not, and is the
steadier estimate of the cost itself.
"""

from rankscope.bench.optimizer.config import EPS, GRAD_RMS, LR, NEVER, OptimizerBenchConfig
from rankscope.bench.optimizer.floor import BACK_PROJECTIONS, RESIDUAL_FAMILIES, Floor, project_and_back
from rankscope.bench.optimizer.implementations import Implementation, OptimizerRun, implementations, state_bytes
from rankscope.bench.optimizer.run import Timings, median_sample, print_report, run_optimizer_bench
from rankscope.bench.optimizer.svd_refresh import randomized_refresh_rows
from rankscope.bench.optimizer.tensors import BenchTensors, bench_tensors, decaying_spectrum, target_shapes

__all__ = ["BACK_PROJECTIONS", "EPS", "GRAD_RMS", "LR", "NEVER", "RESIDUAL_FAMILIES", "BenchTensors", "Floor",
           "Implementation", "OptimizerBenchConfig", "OptimizerRun", "Timings", "bench_tensors", "decaying_spectrum",
           "implementations", "median_sample", "print_report", "project_and_back", "randomized_refresh_rows",
           "run_optimizer_bench", "state_bytes", "target_shapes"]
