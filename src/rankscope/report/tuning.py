"""The report's tuning section: what the tune stage tried and chose per (method, preset), and the
figure of the metric against the learning rate (report/figures/tuning.py). Nothing is added for
a study without a tune stage."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from rankscope.report.collect import sorted_methods, sorted_presets
from rankscope.report.figures.tuning import fig_tuning, read_tuning


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _values(mapping: dict | None) -> str:
    if not mapping:
        return "–"
    return ", ".join(f"{_short(k)}={v:.3g}" if isinstance(v, (int, float)) else f"{_short(k)}={v}"
                     for k, v in sorted(mapping.items()))


def tuning_table(frame: pd.DataFrame, chosen: dict) -> pd.DataFrame:
    """One row per (preset, method): the default, the values tried, the choice and its score."""
    rows = []
    cells = {(str(c["preset"]), c["method"]): c for c in chosen.get("cells", [])}
    for preset in sorted_presets({p for p, _ in cells}):
        for method in sorted_methods({m for p, m in cells if p == preset}):
            cell = cells[(preset, method)]
            mine = frame[(frame["method"] == method) & (frame["preset"].astype(str) == preset)] if len(frame) else frame
            tried = []
            for key in sorted(cell.get("defaults") or {}):
                if key in mine.columns:
                    values = sorted(set(pd.to_numeric(mine[key], errors="coerce").dropna()))
                    tried.append(f"{_short(key)} {values[0]:.3g}..{values[-1]:.3g} ({len(values)})" if values else "–")
            score, std, seeds = cell.get("score"), cell.get("score_std"), cell.get("seeds") or []
            shown = "–" if score is None else (f"{score:.4f} ± {std:.4f}" if std is not None else f"{score:.4f}")
            edges = cell.get("at_edge") or {}
            rows.append({
                "scale": preset, "method": method, "default": _values(cell.get("defaults")),
                "tried": "; ".join(tried) or "–", "chosen": _values(cell.get("values")),
                f"{chosen.get('metric', 'metric')} (seeds)": f"{shown} ({len(seeds)})" if score is not None else "–",
                "diverged runs": cell.get("diverged_runs", 0), "failed runs": cell.get("failed_runs", 0),
                "on an edge": "; ".join(f"{_short(k)} {v['side']}" for k, v in sorted(edges.items())) or "no",
            })
    return pd.DataFrame(rows)


def tuning_section(document, study_dir: Path, figures_dir: Path, tables_dir: Path) -> None:
    """Add the section to `document` (a report.document.Document) and write tables/tuning.csv."""
    data = read_tuning(study_dir)
    if data is None:
        return
    frame, chosen = data
    table = tuning_table(frame, chosen)
    table.to_csv(tables_dir / "tuning.csv", index=False)
    document.heading("Hyper-parameter tuning")
    refine = chosen.get("refine_seeds") or []
    document.paragraph(
        f"Before training, the tune stage searched each method's hyper-parameters per scale on the metric "
        f"`{chosen.get('metric')}` (final validation loss unless stated) of short runs with seeds "
        f"{chosen.get('seeds')}" + (f", then seeds {refine} for the best points" if refine else "")
        + f". A best value on the edge of the grid grew the grid in that direction, up to "
        f"{chosen.get('max_extensions')} times; a diverged run scored worst. The training runs use the chosen values "
        "unless the study sets them itself (tune/results.csv has every tuning run, tune/chosen.json the choices).")
    document.table(table, "default: what a run would use without tuning; tried: the range and number of values; "
                          "the score is the mean ± std over the chosen point's seeds.")
    flags = [f"`{c['method']}` at {c['preset']}: the choice sits on the {v['side']} edge of `{k}` ({v['reason']}); "
             "the best value may lie beyond it."
             for c in chosen.get("cells", []) for k, v in sorted((c.get("at_edge") or {}).items())]
    flags += [f"`{c['method']}` at {c['preset']}: {c['note']}" for c in chosen.get("cells", []) if c.get("note")]
    document.bullets(flags)
    try:
        figures = fig_tuning(study_dir, figures_dir)
    except Exception as exc:  # noqa: BLE001 - a figure never stops the report (as report/figures)
        document.paragraph(f"*Figure skipped — tuning: could not be drawn: {type(exc).__name__}: {exc}*")
        return
    for result in figures:
        if result.path is not None:
            document.figure(result)
        else:
            document.paragraph(f"*Figure skipped — {result.title}: {result.skipped}*")
