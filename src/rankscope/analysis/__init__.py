"""Geometric and spectral analysis of checkpoints.

The modules here hold the pure metric functions (tensors in, numbers out) defined in METRICS.md:

- :mod:`.spectral`       singular values, effective / stable rank, spectral gap, counts, ΔW summaries
- :mod:`.similarity`     linear CKA, cosine and L2 between activations, plus a streaming accumulator
- :mod:`.landscape`      1-D loss-landscape summaries and the direction generators
- :mod:`.interpolation`  barrier heights and parameter interpolation
- :mod:`.hessian`        Hessian top eigenvalue (power iteration) and trace (Hutchinson) from HVPs

They know nothing about runs, checkpoints or models. `rankscope analyze` builds on them:
:mod:`.run` orders the stages of :mod:`.stages` (one module per metric family: plan items,
compute rows, its table), which share :mod:`.probe`, :mod:`.space`, :mod:`.runs` and
:mod:`.store`; :mod:`.pipeline` gathers the public names.
"""

from __future__ import annotations

from rankscope.errors import RankscopeError


class AnalysisError(RankscopeError, ValueError):
    """Bad input to an analysis metric (wrong shape, bad grid, too few points).

    It is a ``ValueError`` as well, so callers that treat metric misuse as a plain value error
    (and the tests written against the spec) catch it either way.
    """


# Defined above before the submodules are imported: each of them imports AnalysisError from here.
from rankscope.analysis import interpolation, landscape, similarity, spectral  # noqa: E402

__all__ = ["AnalysisError", "interpolation", "landscape", "similarity", "spectral"]
