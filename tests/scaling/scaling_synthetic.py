"""Synthetic scaling tables drawn from a known law, shared by the scaling tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

TRUTH = {"E": 1.8, "A": 400.0, "alpha": 0.34, "B": 410.0, "beta": 0.28}
# A 243-start subset of Hoffmann's 4,500-start grid keeps a fit to seconds.
COARSE = {"a": [0, 5, 10], "b": [0, 5, 10], "e": [-1, 0, 1], "alpha": [0, 0.5, 1], "beta": [0, 0.5, 1]}


SIZES, BUDGETS = np.logspace(6, 9, 5), np.logspace(8, 11, 5)


def synthetic(law=TRUTH, sizes=SIZES, budgets=BUDGETS, noise=0.005, seed=0, method="m"):
    rng = np.random.default_rng(seed)
    n, d = np.meshgrid(sizes, budgets, indexing="ij")
    n, d = n.ravel(), d.ravel()
    loss = (law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]) * np.exp(noise * rng.standard_normal(n.size))
    return pd.DataFrame({"method": method, "params": n, "tokens": d, "loss": loss})
