"""The study's figures, one module per figure family (training, landscape, 2-D landscape,
interpolation, spectral, similarity, downstream), all drawn with the conventions of :mod:`.base`
and the sizes, fonts, colours and legend placement of :mod:`.style`.

:func:`render_all` draws every figure of a study; a figure that fails on unexpected data becomes
a skipped line in the report, never a crash of the whole report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from rankscope.report.baseline import SeedBaselines
from rankscope.report.collect import Study
from rankscope.report.figures import style
from rankscope.report.figures.base import (
    METHOD_COLORS,
    STYLE,
    FigureResult,
    method_color,
    palette,
    pick_checkpoints,  # noqa: F401 - kept importable from here
)
from rankscope.report.figures.downstream import fig_downstream, fig_predictor
from rankscope.report.figures.interpolation import (
    fig_ccbh,
    fig_imbh,
    fig_imbh_to_full,
    imbh_matrix,
)
from rankscope.report.figures.intruder import fig_intruder
from rankscope.report.figures.landscape import (
    ProfileCache,
    fig_landscape_random,
    fig_landscape_singular,
    landscape_direction_sets,
)
from rankscope.report.figures.landscape2d import fig_landscape2d
from rankscope.report.figures.similarity import fig_similarity
from rankscope.report.figures.spectral import fig_spectral
from rankscope.report.figures.training import fig_training_curves, fig_val_ppl

log = logging.getLogger("rankscope.report")


def _guarded(function: Callable, name: str, title: str, *args, **kwargs) -> list[FigureResult]:
    """A figure that fails on unexpected data becomes a skipped line in the report, not a crash
    of the whole report (the study may still be running and writing files)."""
    try:
        result = function(*args, **kwargs)
    except Exception as exc:
        log.warning("figure %s failed: %s", name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return [FigureResult(name, title, skipped=f"could not be drawn: {type(exc).__name__}: {exc}")]
    return result if isinstance(result, list) else [result]


def render_preset_figures(study: Study, preset: str, out_dir: Path, profiles: ProfileCache | None = None,
                          baselines: SeedBaselines | None = None) -> list[FigureResult]:
    profiles = profiles or ProfileCache(study)
    baselines = baselines or SeedBaselines(study)
    results: list[FigureResult] = []
    results += _guarded(fig_training_curves, f"training_loss_{preset}", "training loss", study, preset, out_dir)
    results += _guarded(fig_val_ppl, f"val_ppl_{preset}", "validation perplexity", study, preset, out_dir)
    direction_sets = landscape_direction_sets(study, preset, profiles)
    if not direction_sets:
        results.append(FigureResult(f"landscape_{preset}", f"1-D loss landscape ({preset})",
                                    skipped=f"no landscape.csv rows or profiles for preset {preset}"))
    for direction_set in direction_sets:
        function = fig_landscape_singular if direction_set.startswith("singular") else fig_landscape_random
        results += _guarded(function, f"landscape_{direction_set}_{preset}", f"landscape {direction_set}",
                            study, preset, out_dir, profiles=profiles, direction_set=direction_set)
    results += _guarded(fig_landscape2d, f"landscape2d_{preset}", "2-D landscape", study, preset, out_dir)
    results += _guarded(fig_ccbh, f"ccbh_{preset}", "CCBH", study, preset, out_dir)
    results += _guarded(fig_imbh, f"imbh_{preset}", "IMBH", study, preset, out_dir)
    results += _guarded(fig_imbh_to_full, f"imbh_to_full_{preset}", "IMBH to full rank", study, preset, out_dir,
                        baselines=baselines)
    results += _guarded(fig_spectral, f"spectral_{preset}", "spectral metrics", study, preset, out_dir)
    results += _guarded(fig_similarity, f"similarity_{preset}", "activation similarity", study, preset, out_dir,
                        baselines=baselines)
    results += _guarded(fig_intruder, f"intruder_{preset}", "intruder dimensions", study, preset, out_dir)
    results += _guarded(fig_downstream, f"downstream_{preset}", "downstream accuracy", study, preset, out_dir)
    return results


def render_all(study: Study, out_dir: Path, baselines: SeedBaselines | None = None) -> dict[str, list[FigureResult]]:
    """Every figure, grouped by preset ('' for study-wide figures)."""
    import matplotlib as mpl

    with mpl.rc_context(style.RC):
        profiles = ProfileCache(study)
        baselines = baselines or SeedBaselines(study)
        grouped = {preset: render_preset_figures(study, preset, out_dir, profiles, baselines) for preset in study.presets()}
        grouped[""] = _guarded(fig_predictor, "predictor", "predictor", study, out_dir)
    return grouped


__all__ = [
    "METHOD_COLORS", "STYLE", "FigureResult", "ProfileCache", "fig_ccbh", "fig_downstream", "fig_imbh", "fig_imbh_to_full",
    "fig_intruder", "fig_landscape2d", "fig_landscape_random", "fig_landscape_singular", "fig_predictor", "fig_similarity", "fig_spectral",
    "fig_training_curves", "fig_val_ppl", "imbh_matrix", "method_color", "palette", "render_all",
    "render_preset_figures", "style",
]
