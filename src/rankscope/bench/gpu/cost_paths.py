"""The cost paths of the GPU check: a projector refresh at 1B shapes, dense vs factorized
inference, and one landscape point against a plain forward."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from rankscope.bench.common import geometric_mean, median, synchronize, time_calls
from rankscope.bench.gpu.config import LORO_PUBLISHED_SPEEDUP
from rankscope.bench.gpu.paths import Context
from rankscope.errors import RankscopeError


def projector_path(ctx: Context) -> dict[str, Any]:
    """One GaLore projector refresh (rankscope.optim.projector.compute_projection) of a 1B MLP
    gradient in fp32, from the exact SVD and from the randomized one, each timed after a warm-up
    on a small matrix (the solver's first call sets up its handles); both must be orthonormal."""
    from rankscope.optim.projector import compute_projection, projection_side

    config, device = ctx.config, ctx.device
    rows, cols = config.projector_shape
    rank, oversample, niter = config.projector_rank, 8, 2
    generator = torch.Generator().manual_seed(config.seed)
    gradient = torch.randn(rows, cols, generator=generator).to(device)
    side = projection_side(gradient.shape, "std")
    seconds = {}
    for svd in ("exact", "randomized"):
        compute_projection(gradient[: 2 * rank, : 2 * rank], rank, side, svd, oversample, niter)
        synchronize(device)
        started = time.perf_counter()
        projection = compute_projection(gradient, rank, side, svd, oversample, niter, seed=config.seed)
        synchronize(device)
        seconds[svd] = time.perf_counter() - started
        for name, basis in projection.items():
            gram = basis.mT @ basis if name == "proj_left" else basis @ basis.mT
            error = float((gram - torch.eye(rank, device=device)).abs().max())
            if not math.isfinite(error) or error > 1e-3:
                raise RankscopeError(f"{svd} SVD gave a {name} that is not orthonormal (max |PᵀP - I| = {error:.3g})")
    return {"shape": [rows, cols], "rank": rank, "exact_s": seconds["exact"], "randomized_s": seconds["randomized"],
            "svd_oversample": oversample, "svd_niter": niter,
            "exact_over_randomized": seconds["exact"] / seconds["randomized"]}


# ---------------------------------------------------------------------------------------------
# process group, inference, landscape


def build_on_device(preset: str, method: str, overrides: dict[str, Any], device: torch.device,
                    dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A method's initial model created directly on the device (a 1B model in seconds)."""
    from rankscope.bench.train import build_config
    from rankscope.models import get_preset
    from rankscope.train.setup import build_run_model, resolve_model_config

    cfg = build_config(preset, method, 1, 2, overrides)
    vocab = int(overrides.get("vocab_size", get_preset(preset).vocab_size))
    with torch.device(device):
        model, _ = build_run_model(cfg, resolve_model_config(cfg, vocab), seed=seed)
    model.to(dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def infer_path(ctx: Context) -> dict[str, Any]:
    """Dense vs factorized forward latency at the inference preset, bf16."""
    config, device = ctx.config, ctx.device
    dense_name, factorized_name = config.infer_methods
    models = {name: build_on_device(config.infer_preset, name, config.infer_model_overrides, device, torch.bfloat16,
                                    config.seed)
              for name in config.infer_methods}
    vocab = models[dense_name].config.vocab_size
    generator = torch.Generator().manual_seed(config.seed)
    points = []
    for seq_len in config.infer_seq_lens:
        tokens = torch.randint(0, vocab, (config.infer_batch_size, seq_len), generator=generator).to(device)
        latency = {}
        with torch.inference_mode():
            for name, model in models.items():
                latency[name] = median(time_calls(lambda model=model, tokens=tokens: model(tokens), device, 1,
                                                  config.infer_iters))
        points.append({"batch_size": config.infer_batch_size, "seq_len": seq_len,
                       "dense_s": latency[dense_name], "factorized_s": latency[factorized_name],
                       "speedup": latency[dense_name] / latency[factorized_name]})
    params = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    del models
    return {"preset": config.infer_preset, "dense": dense_name, "factorized": factorized_name, "dtype": "bf16",
            "dense_params": params[dense_name], "factorized_params": params[factorized_name], "points": points,
            "speedup_geomean": geometric_mean(p["speedup"] for p in points),
            "published_speedup": LORO_PUBLISHED_SPEEDUP}


def landscape_path(ctx: Context, method: str) -> dict[str, Any]:
    """One landscape / interpolation point against one plain forward over the probe set."""
    from rankscope.analysis.cost import measure_point_cost

    config, device = ctx.config, ctx.device
    model = build_on_device(config.preset, method, config.model_overrides, device, torch.float32, config.seed)
    probe = torch.randint(0, model.config.vocab_size, (config.probe_sequences, config.seq_len),
                          generator=torch.Generator().manual_seed(config.seed))
    cost = measure_point_cost(model, probe, batch_size=min(32, config.probe_sequences), device=device,
                              repeats=3, seed=config.seed)
    return {"preset": config.preset, "method": method, "probe_tokens": probe.numel(),
            "forward_s": cost["forward_s"], "landscape_point_s": cost["landscape_point_s"],
            "landscape_over_forward": cost["landscape_point_s"] / cost["forward_s"],
            "interpolation_point_s": cost["interpolation_point_s"],
            "interpolation_over_forward": cost["interpolation_point_s"] / cost["forward_s"]}
