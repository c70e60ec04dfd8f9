"""Stage `hessian`: sharpness from the Hessian of the probe loss with respect to the perturbed
parameters (the landscape's space and scope): its largest and smallest algebraic eigenvalues
(Lanczos) and its trace (Hutchinson), next to expected sharpness. See
:mod:`rankscope.analysis.hessian` for the estimators and their sources.

Rows `max_eigenvalue`, `min_eigenvalue` and `trace`, each with `converged` and, when it is False,
the reason: a Lanczos estimate whose relative residual is above ``hessian_tolerance`` after
``hessian_iterations`` HVPs, a trace whose standard error is above
``hessian_trace_max_relative_se`` of its value. The value is kept either way (an unconverged
largest Ritz value is still a lower bound of λ_max); only converged rows are findings
(:mod:`rankscope.analysis.features` lists the others in ``unconverged``).

Each Hessian-vector product costs about two forward-and-backward passes over the probe set, so
the family runs at the last step only unless ``hessian_every_checkpoint``; the seconds each
estimate took are kept in the item's notes (meta.json). Rows go to hessian.csv. A model whose layers have no double backward
gets a not-applicable row with the reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from rankscope.analysis import hessian as hess
from rankscope.analysis.settings import settings_hash
from rankscope.analysis.space import scope_parameter_names
from rankscope.analysis.stages.base import Stage
from rankscope.analysis.store import KEY_COLUMNS, Item, TableSpec
from rankscope.models import token_losses

METRICS = ("max_eigenvalue", "min_eigenvalue", "trace")


def _batch_mean_loss(model, batch):
    return token_losses(model, batch).mean()


class HessianStage(Stage):
    table = TableSpec(
        "hessian", KEY_COLUMNS + ["scope", "metric", "value", "standard_error", "hvps", "converged", "applicable", "reason"],
    )

    def plan(self, step: int, steps: Sequence[int]) -> list[Item]:
        s = self.settings
        if self.at_last_step_only(s.hessian_every_checkpoint, step, steps):
            return []
        payload = {"settings": s.family_settings("hessian"), "probe": self.probe.fingerprint, "space": s.space}
        return [Item(step, f"hessian:{scope}", settings_hash(payload), {"scope": scope}) for scope in s.scopes]

    @classmethod
    def describe(cls, run, context) -> dict[str, Any]:
        s = context.settings
        return {"hessian": {"method": "Lanczos (full reorthogonalization): largest and smallest algebraic eigenvalue; "
                                      "Hutchinson trace",
                            "iterations": s.hessian_iterations, "tolerance": s.hessian_tolerance, "samples": s.hessian_samples,
                            "trace_max_relative_se": s.hessian_trace_max_relative_se,
                            "vectors": "seeded Gaussian start (Lanczos), Rademacher (trace)", "seed": s.direction_seed}}

    def compute(self, item: Item) -> dict[str, Any]:
        s = self.settings
        scope = item.context["scope"]
        model, note = self.model_in_space(item.step)
        names = scope_parameter_names(model, scope)
        hvp, like = hess.probe_hvp(model, names, self.probe.batches, self.probe.batch_weights(), _batch_mean_loss)
        head = {"scope": scope}
        try:
            started = time.perf_counter()
            extremes = hess.extreme_eigenvalues(hvp, like, s.hessian_iterations, s.hessian_tolerance, s.direction_seed)
            middle = time.perf_counter()
            trace = hess.hutchinson_trace(hvp, like, s.hessian_samples, s.direction_seed)
            finished = time.perf_counter()
        except RuntimeError as exc:  # e.g. a custom autograd function without double backward
            reason = f"no Hessian-vector product for this model: {str(exc).splitlines()[0]}"
            nan = math.nan
            rows = [{**head, "metric": m, "value": nan, "standard_error": nan, "hvps": 0, "converged": False,
                     "applicable": False, "reason": reason} for m in METRICS]
            return {"rows": rows, "arrays": {}, "notes": {"space_used": note}}
        finally:
            model.zero_grad(set_to_none=True)
        self.progress.advance(1.0)
        trace_reason = hess.trace_unreadable(trace, s.hessian_trace_max_relative_se)
        rows = [
            {**head, "metric": metric, "value": estimate.value, "standard_error": math.nan, "hvps": estimate.hvps,
             "converged": estimate.converged, "applicable": True, "reason": estimate.reason}
            for metric, estimate in (("max_eigenvalue", extremes.largest), ("min_eigenvalue", extremes.smallest))
        ] + [
            {**head, "metric": "trace", "value": trace.value, "standard_error": trace.standard_error, "hvps": trace.samples,
             "converged": not trace_reason, "applicable": True, "reason": trace_reason},
        ]
        # Both extremes share one Krylov space: its HVPs are the larger of the two counts.
        lanczos_hvps = max(extremes.largest.hvps, extremes.smallest.hvps)
        notes = {"space_used": note, "lanczos_seconds": middle - started, "lanczos_hvps": lanczos_hvps,
                 "trace_seconds": finished - middle, "seconds_per_hvp": (finished - started) / (lanczos_hvps + trace.samples),
                 "max_eigenvalue_relative_residual": extremes.largest.residual,
                 "min_eigenvalue_relative_residual": extremes.smallest.residual}
        return {"rows": rows, "arrays": {}, "notes": notes}
