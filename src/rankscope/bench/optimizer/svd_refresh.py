"""The randomized projector refresh (`torch.svd_lowrank`) against the exact SVD: time and the
subspace it gives, per distinct (shape, side)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from rankscope.bench.common import median, run_alternating, timed
from rankscope.bench.optimizer.config import OptimizerBenchConfig
from rankscope.bench.optimizer.tensors import BenchTensors

log = logging.getLogger("rankscope.bench")


def randomized_refresh_rows(tensors: BenchTensors, rank: int, config: OptimizerBenchConfig,
                            device: torch.device) -> list[dict[str, Any]]:
    from rankscope.optim.projector import compute_projection, projection_side

    rows = []
    for shape in dict.fromkeys(tensors.shapes):
        side = projection_side(shape, "std")
        key = "proj_right" if side == "right" else "proj_left"
        grads = [g for s, g in zip(tensors.shapes, tensors.grads) if s == shape]

        def exact(grad, side=side, key=key):
            return compute_projection(grad, rank, side)[key]

        def randomized(grad, side=side, key=key):
            return compute_projection(grad, rank, side, svd="randomized", oversample=config.svd_oversample,
                                      niter=config.svd_niter, seed=config.seed)[key]

        first = grads[0]
        calls = {"exact": lambda: exact(first), "randomized": lambda: randomized(first)}  # noqa: B023 - run in this iteration
        for fn in calls.values():
            fn()  # warm-up (LAPACK / cuSOLVER initialisation)
        samples = run_alternating(list(calls), config.repeats,
                                  lambda name, _: timed(calls[name], device)[0])  # noqa: B023 - run in this iteration
        distances, energies = [], []
        for grad in grads:
            p, q = exact(grad), randomized(grad)
            if side == "right":
                p, q, kept_p, kept_q = p.T, q.T, grad @ p.T, grad @ q.T
            else:
                kept_p, kept_q = p.T @ grad, q.T @ grad
            distances.append(float(torch.linalg.matrix_norm(p @ p.T - q @ q.T) / (2 * rank) ** 0.5))
            energies.append(float(kept_q.square().sum() / kept_p.square().sum()))
        exact_s, randomized_s = median(samples["exact"]), median(samples["randomized"])
        rows.append({"shape": f"{shape[0]}x{shape[1]}", "side": side, "matrices": len(grads), "rank": rank,
                     "oversample": config.svd_oversample, "niter": config.svd_niter,
                     "exact_svd_s": exact_s, "exact_svd_min_s": min(samples["exact"]),
                     "randomized_svd_s": randomized_s, "randomized_svd_min_s": min(samples["randomized"]),
                     "exact_over_randomized": exact_s / randomized_s,
                     "subspace_distance_max": max(distances), "subspace_distance_median": median(distances),
                     "energy_kept_min": min(energies), "energy_kept_median": median(energies)})
        log.info("bench optimizer: randomized refresh %dx%d done", *shape)
    return rows

