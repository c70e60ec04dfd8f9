"""How far each role's parameters move per update, per method, in a study's regime.

    python benchmarks/role_update_sizes.py                       # the demo's regime, updates 101-200
    python benchmarks/role_update_sizes.py --study studies/demo.yaml --first 101 --last 200 --seed 2

For every method and control of the study (each at the lrs it would train with: the study's own,
else rankscope's defaults for the preset, tuned ones included), trains updates 1..LAST on the
study's data with the study's schedule (train.steps long) and, over updates FIRST..LAST, averages
per role: the RMS of the update per entry and ||dW|| / ||W|| (Frobenius). Roles: embeddings, LM
head, norm gains, and the block matrices as the dense W each targeted projection computes
(`effective_weight()`; CoLA, which has none, counts its factors). Prints a Markdown table; asserts
nothing. docs/tuning.md quotes its output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rankscope import methods
from rankscope.data import TrainStream, prepare_data
from rankscope.models import iter_target_linears, token_losses
from rankscope.optim.roles import ROLE_LABELS, parameter_roles
from rankscope.study import load_study, plan_runs
from rankscope.train.setup import build_run_model, build_run_optimizer, resolve_model_config, resolve_optim

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("embed", "head", "norm", "blocks")


def role_tensors(model: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """The tensors whose change each role's update size is measured on (detached copies)."""
    roles = parameter_roles(model)
    out: dict[str, list[torch.Tensor]] = {role: [] for role in ORDER}
    for p in model.parameters():
        if id(p) in roles:
            out[roles[id(p)]].append(p.detach().clone())
    for _, _, _, module in iter_target_linears(model):
        dense = module.effective_weight() if hasattr(module, "effective_weight") else module.weight
        if dense is None:  # CoLA: B·σ(A·x) has no dense W; its factors stand in
            out["blocks"] += [p.detach().clone() for p in module.parameters()]
        else:
            out["blocks"].append(dense.detach().clone())
    return out


def measure(run, first: int, last: int) -> dict[str, tuple[float, float]]:
    cfg = run.config
    data = prepare_data(cfg.data)
    model_cfg = resolve_model_config(cfg, data.vocab_size)
    model, method = build_run_model(cfg, model_cfg)
    optim = resolve_optim(cfg, type(method))
    optimizer = build_run_optimizer(method, model, optim)
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    stream = TrainStream(data.train, seed=cfg.train.seed, batch_size=cfg.train.batch_size)
    sums = {role: [0.0, 0.0] for role in ORDER}
    for step in range(1, last + 1):
        multiplier = method.lr_multiplier(step, optim)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * multiplier
        before = role_tensors(model) if step >= first else None
        token_losses(model, stream.next_batch()).mean().backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                       optim.grad_clip if optim.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(step, model, optimizer)
        if before is None:
            continue
        after = role_tensors(model)
        for role in ORDER:
            delta = sum(float((a - b).pow(2).sum()) for a, b in zip(after[role], before[role]))
            norm = sum(float(b.pow(2).sum()) for b in before[role])
            count = sum(b.numel() for b in before[role])
            sums[role][0] += (delta / max(count, 1)) ** 0.5
            sums[role][1] += (delta / norm) ** 0.5 if norm > 0 else 0.0
    n = last - first + 1
    return {role: (rms / n, rel / n) for role, (rms, rel) in sums.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=str(ROOT / "studies" / "demo.yaml"))
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--first", type=int, default=101, help="first measured update (after the warmup)")
    parser.add_argument("--last", type=int, default=200)
    parser.add_argument("--methods", default="", help="comma-separated subset (default: the study's methods and controls)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = load_study(args.study)
    spec.grid.seeds = [args.seed]
    wanted = set(args.methods.split(",")) if args.methods else None
    print(f"Per-update size over updates {args.first}-{args.last} (seed {args.seed}, {spec.name}'s regime): "
          "RMS of the update per entry (||dW|| / ||W||).\n")
    print("| run | lr | " + " | ".join(ROLE_LABELS[r] for r in ORDER) + " | blocks / embeddings |")
    print("|---|---|" + "---|" * (len(ORDER) + 1))
    for run in plan_runs(spec):
        if wanted and run.method not in wanted:
            continue
        sizes = measure(run, args.first, args.last)
        optim = resolve_optim(run.config, methods.get(run.method))
        dense = optim.roles.get("embed", {}).get("lr", optim.lr)
        cells = [f"{rms:.2e} ({rel:.1e})" for rms, rel in (sizes[r] for r in ORDER)]
        ratio = sizes["blocks"][0] / sizes["embed"][0] if sizes["embed"][0] > 0 else float("nan")
        print(f"| {run.method} | {optim.lr:g} (dense {dense:g}) | " + " | ".join(cells) + f" | {ratio:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
