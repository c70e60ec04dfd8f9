"""The report's tuning section: the tuning protocol, what the tune stage tried and chose per
(method, preset), and the figure of the metric against the learning rate
(report/figures/tuning.py). Nothing is added for a study without a tune stage.

The protocol (tune/chosen.json `protocol`): "independent" tunes each method on its own, its one lr
also driving its embeddings, head and norms; "shared-dense" tunes full rank's lr jointly with one
lr for those (stage 1, keys `dense_keys` tied to one value) and then every other method's own keys
with that dense lr fixed (stage 2). A chosen.json written before protocols existed was tuned the
independent way."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from rankscope.io import read_json
from rankscope.report.collect import is_control, method_label, sorted_methods, sorted_presets
from rankscope.report.figures.tuning import fig_tuning, read_tuning
from rankscope.study.spec import CAN_SEPARATE

SHARED_DENSE, INDEPENDENT = "shared-dense", "independent"
DENSE_LABEL = "dense_lr"
STAGES = {0: "–", 1: "1: with the dense lr", 2: "2: dense lr fixed"}


def _short(key: str, dense_keys: tuple[str, ...] = ()) -> str:
    return DENSE_LABEL if key in dense_keys else key.rsplit(".", 1)[-1]


def _value_text(value) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else str(value)


def _values(mapping: dict | None, dense_keys: tuple[str, ...] = ()) -> str:
    """`key=value, ...`; the dense keys, tied to one value, shown once as dense_lr (each on its own
    should they ever differ)."""
    if not mapping:
        return "–"
    dense = {mapping[k] for k in dense_keys if k in mapping}
    tied = len(dense) == 1
    shown = {(_short(k, dense_keys) if tied else _short(k)): v for k, v in mapping.items()}
    return ", ".join(f"{name}={_value_text(value)}" for name, value in sorted(shown.items()))


def _dense_text(values: dict | None) -> str:
    """Stage 1's dense lrs: one number when tied to one value (by design), else each key's."""
    if not values:
        return "–"
    distinct = set(values.values())
    return _value_text(distinct.pop()) if len(distinct) == 1 else _values(values)


def _and_controls(chosen: dict) -> str:
    controls = [m for m in chosen.get("members") or [] if is_control(m)]
    return f" and the control{'s' if len(controls) > 1 else ''} ({', '.join(controls)})" if controls else ""


def protocol_text(chosen: dict) -> str:
    """How the tune stage treated the embeddings, head and norms, from chosen.json."""
    protocol = chosen.get("protocol")
    if protocol == SHARED_DENSE:
        shared = chosen.get("shared_dense") or {}
        dense_keys = tuple(chosen.get("dense_keys") or ())
        picks = "; ".join(f"{preset} {_dense_text(values)}" for preset, values in sorted(shared.items())) or "none"
        return (f"Tuning protocol **{SHARED_DENSE}**: stage 1 tuned full rank's block lr jointly with one lr shared by "
                f"the embeddings, LM head and norms ({', '.join(f'`{k}`' for k in dense_keys)}, tied to one value; "
                f"chosen per scale: {picks}); stage 2 kept that lr for every other method{_and_controls(chosen)} and "
                "tuned only each method's own hyper-parameters, so the methods differ only in what they do to the "
                "block matrices. Stage 1's grid is two-dimensional: the figure draws full rank's lr curve once per "
                "dense lr.")
    dated = "" if protocol else " (chosen.json predates tuning protocols; it was tuned this way)"
    return (f"Tuning protocol **{protocol or INDEPENDENT}**{dated}: every method tuned its own hyper-parameters, and "
            "its single lr also drives its embeddings, head and norms (as in the official harnesses), so a choice "
            "mixes what the method does to the block matrices with the lr its dense parameters got.")


def regime_lines(chosen: dict) -> list[str]:
    """Per scale, whether the tuning runs' own regime could separate the methods: the control at
    the shared dense lr against the best tuned score (chosen.json `informativeness`)."""
    lines = []
    for preset, verdict in sorted((chosen.get("informativeness") or {}).items()):
        where = (f"At {preset} the tuning runs' {verdict['control']} control (block matrices at init, dense lr shared) "
                 f"scored {verdict['control_score']:.4f}, {verdict['gap']:.3f} nats behind the best tuned point "
                 f"({verdict['best_method']}, {verdict['best_score']:.4f}; margin {verdict['margin']:.3g}): ")
        if verdict["verdict"] == CAN_SEPARATE:
            lines.append(where + "the tuning regime can separate the methods.")
        else:
            lines.append(where + "**the tuning regime cannot separate methods by their block matrices**, so its "
                         "choices of each method's own lr rest on differences the control also reaches; re-tune in "
                         "a longer regime before reading them as the methods' best lrs.")
    return lines


def tuning_table(frame: pd.DataFrame, chosen: dict) -> pd.DataFrame:
    """One row per (preset, method): the default, the values tried, the choice and its score."""
    rows = []
    dense_keys = tuple(chosen.get("dense_keys") or ())
    staged = chosen.get("protocol") == SHARED_DENSE
    cells = {(str(c["preset"]), c["method"]): c for c in chosen.get("cells", [])}
    for preset in sorted_presets({p for p, _ in cells}):
        for method in sorted_methods({m for p, m in cells if p == preset}):
            cell = cells[(preset, method)]
            mine = frame[(frame["method"] == method) & (frame["preset"].astype(str) == preset)] if len(frame) else frame
            tried = []
            for key in sorted(cell.get("defaults") or {}):
                if key in mine.columns:
                    values = sorted(set(pd.to_numeric(mine[key], errors="coerce").dropna()))
                    tried.append(f"{_short(key, dense_keys)} {values[0]:.3g}..{values[-1]:.3g} ({len(values)})"
                                 if values else "–")
            score, std, seeds = cell.get("score"), cell.get("score_std"), cell.get("seeds") or []
            shown = "–" if score is None else (f"{score:.4f} ± {std:.4f}" if std is not None else f"{score:.4f}")
            edges = cell.get("at_edge") or {}
            row = {"scale": preset, "method": method_label(method)}
            if staged:
                row["stage"] = STAGES.get(cell.get("stage"), str(cell.get("stage")))
                row["dense lr fixed at"] = _dense_text(cell.get("fixed"))
            rows.append({
                **row,
                "default": _values(cell.get("defaults"), dense_keys),
                "tried": "; ".join(tried) or "–", "chosen": _values(cell.get("values"), dense_keys),
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
    document.paragraph(protocol_text(chosen))
    for line in regime_lines(chosen):
        document.paragraph(line)
    document.table(table, "default: what a run would use without tuning; tried: the range and number of values; "
                          "the score is the mean ± std over the chosen point's seeds.")
    tuning_seeds = set(chosen.get("seeds") or []) | set(refine)
    regime = read_json(study_dir / "regime.json") or {}
    shared = sorted(tuning_seeds & set(regime.get("seeds") or []))
    if shared:
        document.paragraph(f"**The tuning runs share seed(s) {shared} with the study's runs**: at those seeds a chosen "
                           "value was picked on the very validation loss the runs then report, which favours it. "
                           "Seeds outside the tuning seeds give the fair comparison.")
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
