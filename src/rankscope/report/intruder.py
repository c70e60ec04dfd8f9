"""The report's intruder-dimension section: per method, how many of its block matrices' top singular
vectors are new against full rank (same seed, other seeds) and against its own initialisation,
read against the full-rank seed baseline (intruder.csv; definition in docs/metrics.md).

Values are each run's `total` count (summed over its matrices, the official aggregate) at its last
analysed step; per method the mean ± std over its comparisons. Full rank's row shows the seed
baseline (its cross-seed comparisons) in place of its comparison with itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from rankscope.report.collect import (
    REFERENCE_METHOD,
    Study,
    applicable_mask,
    sorted_methods,
)

if TYPE_CHECKING:  # document.py imports the figures, which import this module
    from rankscope.report.document import Document

COLUMNS = {"same-seed": "vs full rank, same seed", "cross-seed": "vs full rank, other seeds", "init": "vs own init"}


def preset_rows(study: Study, preset: str) -> pd.DataFrame | None:
    """intruder.csv rows of one scale (None when there are none)."""
    table = study.tables.get("intruder")
    if table is None:
        return None
    table = table[table["preset"].astype(str) == str(preset)]
    return table if not table.empty else None


def last_step(table: pd.DataFrame) -> pd.DataFrame:
    table = table.assign(step=pd.to_numeric(table["step"], errors="coerce"))
    last = table.groupby("run")["step"].transform("max")
    return table[table["step"] == last]


def _cell(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    if len(values) == 1:
        return f"{values.iloc[0]:.1f} (n 1)"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f} (n {len(values)})"


def intruder_summary(study: Study, preset: str) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(numeric long table, display table, notes) of the total intruder counts at the last step."""
    table = preset_rows(study, preset)
    if table is None:
        return pd.DataFrame(), pd.DataFrame(), [f"no intruder.csv rows for preset {preset}"]
    notes = sorted({f"{m}: {r}" for m, r in table.loc[~applicable_mask(table), ["method", "reason"]]
                    .astype(str).itertuples(index=False)})
    totals = table[applicable_mask(table) & (table["matrix"] == "total") & (table["metric"] == "intruders")]
    totals = last_step(totals)
    numeric = totals[["run", "method", "seed", "step", "reference_run", "pairing", "value"]].reset_index(drop=True)
    rows = []
    for method in sorted_methods(numeric["method"].unique()):
        mine = numeric[numeric["method"] == method]
        row = {"method": method}
        for pairing, label in COLUMNS.items():
            values = mine.loc[mine["pairing"] == pairing, "value"]
            if method == REFERENCE_METHOD and pairing == "same-seed":
                values = mine.loc[mine["pairing"] == "cross-seed", "value"]  # the seed baseline
                row[label] = f"seed baseline {_cell(values)}" if len(values) else "–"
                continue
            row[label] = _cell(values)
        rows.append(row)
    return numeric, pd.DataFrame(rows), notes


def saturation(study: Study, preset: str, numeric: pd.DataFrame, k: int) -> str:
    """A sentence when the full-rank seed baseline already counts (nearly) every top direction as an
    intruder: then no method's count against full rank can be told apart from another seed's."""
    baseline = numeric[(numeric["method"] == REFERENCE_METHOD) & (numeric["pairing"] == "cross-seed")]["value"]
    table = preset_rows(study, preset)
    per_matrix = table[(table["metric"] == "intruders") & (pd.to_numeric(table["layer"], errors="coerce") >= 0)]
    matrices = int(per_matrix.groupby(["run", "reference_run", "step"]).size().max()) if len(per_matrix) else 0
    ceiling = k * matrices
    if baseline.empty or not ceiling or baseline.mean() < 0.95 * ceiling:
        return ""
    return (f"**Saturated at this scale:** two full-rank runs of different seeds already share almost none of their top "
            f"{k} directions (seed baseline {baseline.mean():.1f} of {ceiling} possible), so no count against full rank "
            "can be read as a difference between methods here; only the counts against each run's own initialisation "
            "say something (how much of its initial top subspace a run keeps).")


def intruder_section(document: Document, study: Study, preset: str, tables_dir: Path) -> None:
    numeric, display, notes = intruder_summary(study, preset)
    if numeric.empty:
        return
    metrics = study.tables["intruder"]["metric"].astype(str)
    k = int(metrics[metrics.str.startswith("similarity_")].str.removeprefix("similarity_").astype(int).max())
    numeric.to_csv(tables_dir / f"intruders_{preset}.csv", index=False)
    document.heading("Intruder dimensions", 3)
    top = f"top {k}"
    document.paragraph(
        f"How many of a run's {top} singular directions per block matrix have no counterpart (largest |cosine| below "
        "the threshold) among the reference's singular directions (Shuttleworth et al. 2024), summed over the block "
        "matrices, at the last analysed checkpoint. Read a method's count against full rank next to the seed "
        "baseline: the count between two full-rank runs of different seeds. Against the initialisation most top "
        "directions are new for every method, full rank included; compare with full rank's own count.")
    document.table(display, f"Mean ± std over the comparisons (n); per matrix and layer: tables/intruders_{preset}.csv "
                            "and the runs' analysis/intruder.csv.")
    saturated = saturation(study, preset, numeric, k)
    if saturated:
        document.paragraph(saturated)
    if notes:
        document.bullets([f"Not applicable — {note}" for note in notes])
