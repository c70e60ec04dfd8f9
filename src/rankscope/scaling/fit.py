"""Fitting L(N, D) = E + A/N^α + B/D^β per method: Hoffmann et al. 2022's approach 3 as
re-derived by Besiroglu et al. 2024 ("Chinchilla scaling: a replication attempt").

The law is fitted in log space through its log-sum-exp form,
    log L̂ = LSE(a − α·log N, b − β·log D, e),  A = eᵃ, B = eᵇ, E = eᵉ,
minimising the Huber loss (δ = 1e-3) of log L̂ − log L summed over the runs, with L-BFGS started
from every point of Hoffmann's grid of initialisations (α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …, 1},
a, b ∈ {0, 5, …, 25}: 4,500 starts) and the best end point kept. The sum (not the mean) and tight
tolerances matter: Besiroglu et al. trace Hoffmann's implausible estimates to an optimizer that
stopped early on a badly scaled objective. Confidence intervals are percentile intervals of a
nonparametric bootstrap over runs, each resample refitted from the point estimate.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from rankscope.errors import ScalingFitError  # noqa: F401 - re-exported: its old home

log = logging.getLogger("rankscope.scaling")

PARAMETERS = ("E", "A", "alpha", "B", "beta")
REQUIRED_COLUMNS = ("method", "params", "tokens", "loss")
# Hoffmann et al. 2022, appendix D.2 (the grid Besiroglu et al. 2024 reuse).
HOFFMANN_GRID: dict[str, tuple[float, ...]] = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}
MIN_SIZES = 3  # A/N^α next to E needs three sizes: with two, A and α trade off exactly
MIN_BUDGETS = 3
MIN_POINTS = 6  # more runs than the five parameters


@dataclass
class FitSettings:
    huber_delta: float = 1e-3
    bootstrap: int = 1000  # resamples for the confidence intervals (0: no intervals)
    confidence: float = 0.95
    seed: int = 0
    # Initialisation grid {a, b, e, alpha, beta: values}; empty = Hoffmann's 4,500 starts.
    grid: dict[str, list[float]] = field(default_factory=dict)
    max_iter: int = 1000

    def validate(self) -> None:
        if not self.huber_delta > 0:
            raise ScalingFitError(f"fit.huber_delta must be positive, got {self.huber_delta}")
        if self.bootstrap < 0:
            raise ScalingFitError(f"fit.bootstrap must be >= 0, got {self.bootstrap}")
        if not 0 < self.confidence < 1:
            raise ScalingFitError(f"fit.confidence must be in (0, 1), got {self.confidence}")
        unknown = set(self.grid) - set(HOFFMANN_GRID)
        if unknown:
            raise ScalingFitError(f"fit.grid has unknown keys {sorted(unknown)}; use {', '.join(HOFFMANN_GRID)}")
        empty = [key for key, values in self.grid.items() if not list(values)]
        if empty:
            raise ScalingFitError(f"fit.grid lists no values for {', '.join(empty)}; give at least one start value each")

    def starts(self) -> np.ndarray:
        """Initial (a, b, e, alpha, beta) points: every combination of the grid's values."""
        grid = {**HOFFMANN_GRID, **{k: tuple(v) for k, v in self.grid.items()}}
        return np.array(list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])), dtype=float)


@dataclass
class LawFit:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    objective: float
    converged: bool
    theta: np.ndarray  # (a, b, e, alpha, beta), the fitted coordinates (E = eᵉ may underflow to 0)

    def params(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in PARAMETERS}

    def predict(self, N, D) -> np.ndarray:
        return self.E + self.A / np.asarray(N, float) ** self.alpha + self.B / np.asarray(D, float) ** self.beta


# ---------------------------------------------------------------------------------------------
# the objective


def huber_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
                    delta: float) -> tuple[float, np.ndarray]:
    """Σ Huber_δ(LSE(a − α·log N, b − β·log D, e) − log L) and its gradient in (a, b, e, α, β)."""
    a, b, e, alpha, beta = theta
    t1 = a - alpha * log_n
    t2 = b - beta * log_d
    top = np.maximum(np.maximum(t1, t2), e)
    w1, w2, w3 = np.exp(t1 - top), np.exp(t2 - top), np.exp(e - top)
    total = w1 + w2 + w3
    residual = top + np.log(total) - log_loss
    size = np.abs(residual)
    small = size <= delta
    value = np.where(small, 0.5 * residual * residual, delta * (size - 0.5 * delta)).sum()
    # d Huber / d residual, times the softmax weights d LSE / d term
    slope = np.where(small, residual, delta * np.sign(residual)) / total
    g1, g2, g3 = slope * w1, slope * w2, slope * w3
    return float(value), np.array([g1.sum(), g2.sum(), g3.sum(), -(g1 @ log_n), -(g2 @ log_d)])


def _scaled_objective(theta, log_n, log_d, log_loss, delta):
    value, grad = huber_objective(theta, log_n, log_d, log_loss, delta)
    return value / delta**2, grad / delta**2


def _lbfgs(theta0: np.ndarray, data: tuple, delta: float, max_iter: int):
    """L-BFGS on the objective divided by δ²: the minimiser is the same, and a residual of δ then
    weighs ~1, so scipy's tolerances (relative to max(|f|, 1)) do not stop the search on the tiny
    raw sums of Huber terms, the early stop Besiroglu et al. found behind Hoffmann's estimates."""
    result = minimize(_scaled_objective, theta0, args=(*data, delta), jac=True, method="L-BFGS-B",
                      options={"maxiter": max_iter, "maxcor": 20})
    result.fun = result.fun * delta**2
    return result


def _exp(x: float) -> float:
    """eˣ, infinite instead of an OverflowError (a coordinate the data leave unbounded)."""
    return math.exp(x) if x < 709.0 else math.inf


def _as_fit(theta: np.ndarray, value: float, converged: bool) -> LawFit:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return LawFit(E=_exp(e), A=_exp(a), alpha=alpha, B=_exp(b), beta=beta, objective=value,
                  converged=converged, theta=np.array(theta, dtype=float))


# ---------------------------------------------------------------------------------------------
# fitting


def check_identifiable(params: np.ndarray, tokens: np.ndarray, label: str) -> None:
    """Refuse data that cannot pin down the five parameters, in one line naming what is missing."""
    sizes, budgets = np.unique(params), np.unique(tokens)
    if len(sizes) < MIN_SIZES:
        raise ScalingFitError(
            f"{label}: {len(sizes)} model size{'s' if len(sizes) != 1 else ''} ({', '.join(f'{v:.4g}' for v in sizes)}) "
            f"cannot identify L(N, D) = E + A/N^alpha + B/D^beta: A/N^alpha needs runs at >= {MIN_SIZES} model sizes"
        )
    if len(budgets) < MIN_BUDGETS:
        raise ScalingFitError(
            f"{label}: {len(budgets)} token budget{'s' if len(budgets) != 1 else ''} ({', '.join(f'{v:.4g}' for v in budgets)}) "
            f"cannot identify L(N, D) = E + A/N^alpha + B/D^beta: B/D^beta needs runs at >= {MIN_BUDGETS} token budgets"
        )
    if len(params) < MIN_POINTS:
        raise ScalingFitError(f"{label}: {len(params)} runs cannot fit 5 parameters; the law needs >= {MIN_POINTS} runs")


def fit_law(params, tokens, loss, settings: FitSettings | None = None, starts: np.ndarray | None = None) -> LawFit:
    """The approach-3 fit of one method's runs: L-BFGS from every start, the best end point."""
    settings = settings or FitSettings()
    data = (np.log(np.asarray(params, float)), np.log(np.asarray(tokens, float)), np.log(np.asarray(loss, float)))
    best = None
    for theta0 in settings.starts() if starts is None else starts:
        result = _lbfgs(theta0, data, settings.huber_delta, settings.max_iter)
        if np.all(np.isfinite(result.x)) and math.isfinite(result.fun) and (best is None or result.fun < best.fun):
            best = result
    if best is None:
        raise ScalingFitError("the scaling-law fit diverged from every initialisation; check the table's values")
    return _as_fit(best.x, float(best.fun), bool(best.success))


def bootstrap_fits(params, tokens, loss, point: LawFit, settings: FitSettings) -> tuple[np.ndarray, int]:
    """(resamples x 5 array of E, A, alpha, B, beta refitted on runs drawn with replacement,
    number of draws skipped because they no longer identify the law)."""
    params, tokens, loss = (np.asarray(v, float) for v in (params, tokens, loss))
    rng = np.random.default_rng(settings.seed)
    samples, skipped, attempts = [], 0, 0
    while len(samples) < settings.bootstrap and attempts < 20 * max(1, settings.bootstrap):
        attempts += 1
        index = rng.integers(0, len(params), len(params))
        if len(np.unique(params[index])) < MIN_SIZES or len(np.unique(tokens[index])) < MIN_BUDGETS:
            skipped += 1
            continue
        fit = fit_law(params[index], tokens[index], loss[index], settings, starts=point.theta[None, :])
        samples.append([getattr(fit, name) for name in PARAMETERS])
    return np.array(samples).reshape(-1, len(PARAMETERS)), skipped


def interval(values: np.ndarray, confidence: float) -> list[float | None]:
    """Percentile interval of the finite values ([None, None] when there are none)."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if not len(values):
        return [None, None]
    tail = 50.0 * (1.0 - confidence)
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail))]


@dataclass
class MethodFit:
    method: str
    law: LawFit
    samples: np.ndarray  # bootstrap resamples x (E, A, alpha, B, beta)
    skipped: int
    n_runs: int

    def as_json(self, confidence: float) -> dict:
        """The fits.json entry: point estimates and an interval for every parameter."""
        ci = {name: interval(self.samples[:, i], confidence) if len(self.samples) else [None, None]
              for i, name in enumerate(PARAMETERS)}
        return {**self.law.params(), "ci": ci}


def fit_table(table: pd.DataFrame, settings: FitSettings | None = None) -> dict[str, MethodFit]:
    """Fit every method of a validated table (see `read_table`); refuses before fitting any if
    one method's runs cannot identify the law."""
    from threadpoolctl import threadpool_limits

    settings = settings or FitSettings()
    settings.validate()
    groups = {str(m): g for m, g in table.groupby("method", sort=True)}
    for method, group in groups.items():
        check_identifiable(group["params"].to_numpy(float), group["tokens"].to_numpy(float), f"method {method}")
    fits = {}
    with threadpool_limits(1):  # arrays of a few dozen runs: BLAS threads would only contend
        for method, group in groups.items():
            fits[method] = _fit_method(method, group, settings)
    return fits


def _fit_method(method: str, group: pd.DataFrame, settings: FitSettings) -> MethodFit:
    log.info("fitting %s: %d runs, %d L-BFGS starts, %d bootstrap resamples", method, len(group),
             len(settings.starts()), settings.bootstrap)
    n, d, loss = (group[c].to_numpy(float) for c in ("params", "tokens", "loss"))
    law = fit_law(n, d, loss, settings)
    samples, skipped = bootstrap_fits(n, d, loss, law, settings) if settings.bootstrap else (np.empty((0, 5)), 0)
    return MethodFit(method, law, samples, skipped, len(group))


def read_table(path: str | Path) -> pd.DataFrame:
    """A scaling table with at least the columns method, params, tokens, loss (others are kept
    for the compute-optimal step, e.g. flops_per_token); rows with a missing value are refused."""
    path = Path(path)
    if not path.is_file():
        raise ScalingFitError(f"scaling table {str(path)!r} does not exist; pass a CSV with columns {', '.join(REQUIRED_COLUMNS)}")
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise ScalingFitError(f"{path} is not a readable CSV ({exc})".splitlines()[0]) from None
    return validate_table(table, str(path))


def validate_table(table: pd.DataFrame, label: str = "scaling table") -> pd.DataFrame:
    table = table.rename(columns=lambda c: str(c).strip())
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ScalingFitError(f"{label} lacks the column{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                              f"a scaling table needs {', '.join(REQUIRED_COLUMNS)} (extra columns are ignored)")
    if table.empty:
        raise ScalingFitError(f"{label} has no rows")
    table = table.copy()
    table["method"] = table["method"].astype(str)
    for column in ("params", "tokens", "loss"):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = table.index[~np.isfinite(values) | (values <= 0)]
        if len(bad):
            row = int(bad[0])
            value = table.loc[row, column]
            shown = repr(value) if isinstance(value, str) else f"{float(value):g}"
            raise ScalingFitError(f"{label}: row {row + 2} has {column} = {shown}; "
                                  f"{column} must be a positive number in every row")
        table[column] = values.astype(float)
    return table
