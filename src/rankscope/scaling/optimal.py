"""Compute-optimal model size and data per method, with FLOPs counted per method.

Training compute is C = F(N)·D, F the training FLOPs per token of the method's model of size N
(a factorized layer costs 2·r·(m+n) per token forward instead of 2·m·n, so F is not 6·N for
low-rank methods). Over the study's sizes F is well described by a power law F = k·N^γ (fitted
in log-log space; γ = 1, k = 6 is Chinchilla's dense approximation, used when the table has no
measured FLOPs). Minimising L(N, D) = E + A/N^α + B/D^β along C = k·N^γ·D gives

    N*(C) = G·C^a,  a = β / (α + γ·β),  G = (α·A / (γ·β·B·k^β))^(1 / (α + γ·β)),
    D*(C) = C / (k·N*^γ) ∝ C^(1 − γ·a),

which reduces to Hoffmann et al.'s N* = G·(C/6)^(β/(α+β)) for γ = 1, k = 6. The inference cost of
the compute-optimal model is its forward FLOPs per token, fitted the same way (2·N when not
measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

TRAIN_FLOPS = "flops_per_token"
INFERENCE_FLOPS = "inference_flops_per_token"


@dataclass
class FlopsModel:
    """FLOPs per token as k·N^γ."""

    k: float
    gamma: float
    source: str  # "measured" (fitted to the table) or the dense approximation used
    max_rel_error: float = 0.0  # of the power law at the measured sizes

    def __call__(self, params):
        return self.k * np.asarray(params, float) ** self.gamma

    def as_json(self) -> dict:
        return {"k": self.k, "gamma": self.gamma, "source": self.source, "max_rel_error": self.max_rel_error}


def flops_model(rows: pd.DataFrame, column: str, dense_factor: float) -> FlopsModel:
    """k·N^γ through the (params, FLOPs per token) pairs of one method's runs; without the column
    (or with fewer than two sizes) the dense approximation dense_factor·N."""
    if column in rows.columns:
        pairs = rows[["params", column]].apply(pd.to_numeric, errors="coerce").dropna()
        pairs = pairs[(pairs["params"] > 0) & (pairs[column] > 0)].drop_duplicates("params")
        if len(pairs) >= 2:
            x, y = np.log(pairs["params"].to_numpy()), np.log(pairs[column].to_numpy())
            gamma, log_k = np.polyfit(x, y, 1)
            model = FlopsModel(math.exp(log_k), float(gamma), "measured")
            model.max_rel_error = float(np.max(np.abs(model(pairs["params"]) / pairs[column].to_numpy() - 1)))
            return model
    return FlopsModel(dense_factor, 1.0, f"{dense_factor:g}·N (dense approximation; no {column} column)")


def has_optimum(law: dict) -> bool:
    """A finite compute-optimal size needs a loss that falls with both N and D (α, β, A, B > 0)."""
    return all(law[k] > 0 and math.isfinite(law[k]) for k in ("alpha", "beta", "A", "B"))


def optimal_exponents(alpha: float, beta: float, gamma: float) -> tuple[float, float]:
    """(a, b) of N* ∝ C^a and D* ∝ C^b; NaN where the law has no optimum (α or β ≤ 0)."""
    if not (alpha > 0 and beta > 0):
        return math.nan, math.nan
    a = beta / (alpha + gamma * beta)
    return a, 1.0 - gamma * a


def optimal_params(law: dict, flops: FlopsModel, compute) -> np.ndarray:
    """N*(C) for the law {E, A, alpha, B, beta} and the method's training FLOPs per token (NaN
    where the law has no optimum)."""
    compute = np.asarray(compute, float)
    if not has_optimum(law):
        return np.full_like(compute, math.nan)
    alpha, beta, A, B = law["alpha"], law["beta"], law["A"], law["B"]
    denominator = alpha + flops.gamma * beta
    G = (alpha * A / (flops.gamma * beta * B * flops.k**beta)) ** (1.0 / denominator)
    return G * compute ** (beta / denominator)


def loss(law: dict, params, tokens) -> np.ndarray:
    return law["E"] + law["A"] / np.asarray(params, float) ** law["alpha"] + law["B"] / np.asarray(tokens, float) ** law["beta"]


def frontier(law: dict, train: FlopsModel, inference: FlopsModel, budgets) -> pd.DataFrame:
    """At each compute budget C: N*, D*, the predicted loss and the inference FLOPs per token."""
    budgets = np.asarray(budgets, float)
    n_opt = optimal_params(law, train, budgets)
    d_opt = budgets / train(n_opt)
    return pd.DataFrame({"compute": budgets, "params": n_opt, "tokens": d_opt, "loss": loss(law, n_opt, d_opt),
                         "inference_flops_per_token": inference(n_opt)})


def default_budgets(table: pd.DataFrame, count: int = 7, beyond: float = 100.0) -> np.ndarray:
    """Log-spaced budgets from the smallest measured run's compute to `beyond` x the largest."""
    compute = table["compute"].to_numpy(float)
    return np.logspace(math.log10(compute.min()), math.log10(compute.max() * beyond), count)
