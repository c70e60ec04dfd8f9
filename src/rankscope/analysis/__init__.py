"""Geometric and spectral analysis of checkpoints.

The modules here hold the pure metric functions (tensors in, numbers out) defined in METRICS.md:

- :mod:`.spectral`       singular values, effective / stable rank, spectral gap, counts, ΔW summaries
- :mod:`.similarity`     linear CKA, cosine and L2 between activations, plus a streaming accumulator
- :mod:`.landscape`      1-D loss-landscape summaries and the direction generators
- :mod:`.interpolation`  barrier heights and parameter interpolation
- :mod:`.hessian`        Hessian largest and smallest eigenvalue (Lanczos) and trace (Hutchinson) from HVPs

They know nothing about runs, checkpoints or models. `rankscope analyze` builds on them:
:mod:`.run` orders the stages of :mod:`.stages` (one module per metric family: plan items,
compute rows, its table), which share :mod:`.probe`, :mod:`.space`, :mod:`.context` and
:mod:`.store`; :mod:`.pipeline` gathers the public names. AnalysisError is defined in
:mod:`rankscope.errors` and re-exported here.
"""

from __future__ import annotations

from rankscope.analysis import interpolation, landscape, similarity, spectral
from rankscope.errors import AnalysisError

__all__ = ["AnalysisError", "interpolation", "landscape", "similarity", "spectral"]
