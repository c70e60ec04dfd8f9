"""The report's tables: per-scale results (mean ± std over seeds), final-checkpoint geometry and
the predictor scores; plus the results table printed to the terminal when a study or the demo
finishes. (The comparisons between methods, in words and numbers: :mod:`.significance`.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rankscope.report.collect import REFERENCE_METHOD, finite, is_control, load_study, method_label, sorted_methods
from rankscope.report.document import format_cell
from rankscope.report.run_features import parse_reasons
from rankscope.report.stats import format_mean_std, format_number, mean_std

MIB = 1024.0 ** 2
UNCONVERGED_MARK = "†"  # a value whose estimator did not converge: shown, never tested

# Run-level metrics compared across methods: column -> (label, "higher is better?" shown only as text).
METRIC_LABELS: dict[str, str] = {
    "val_loss": "val loss",
    "val_ppl": "val ppl",
    "downstream_acc": "downstream mean acc",
    "es_random": "expected sharpness (random)",
    "dv_random": "direction variance (random)",
    "es_singular_top1": "expected sharpness (top-1 singular)",
    "es_singular_top5": "expected sharpness (top-5 singular)",
    "dv_singular_top5": "direction variance (top-5 singular)",
    "ccbh_final": "CCBH (last pair)",
    "imbh_to_full": "IMBH to full-rank",
    "hessian_max_eigenvalue": "Hessian largest eigenvalue",
    "hessian_min_eigenvalue": "Hessian most negative eigenvalue",
    "hessian_trace": "Hessian trace",
    "effective_rank_w": "effective rank of W",
    "stable_rank_w": "stable rank of W",
    "numerical_rank_ratio_w": "numerical rank / min(m, n) of W",
    "sv_ratio_w": "σ₂/σ₁ of W",
    "effective_rank_w_merged": "effective rank of merged W",
    "effective_rank_dw": "effective rank of ΔW",
    "update_ratio_pooled": "‖ΔW‖ / ‖W‖ pooled over matrices",
    "cka_to_reference": "CKA to full-rank (mean over layers)",
    "cka_last_layer": "CKA to full-rank (last layer)",
    "cosine_to_reference": "cosine to full-rank (mean over layers)",
    "relative_l2_to_reference": "relative L2 to full-rank (mean over layers)",
    "activation_norm": "mean activation norm (mean over layers)",
}
# The final-checkpoint tables of each scale: a heading, the metrics, and what the reader needs to read them.
GEOMETRY_TABLES: list[tuple[str, list[str], str]] = [
    ("Loss landscape, barriers and curvature",
     ["es_random", "dv_random", "es_singular_top1", "es_singular_top5", "dv_singular_top5", "ccbh_final", "imbh_to_full",
      "hessian_max_eigenvalue", "hessian_min_eigenvalue", "hessian_trace"],
     "Expected sharpness and direction variance of 1-D profiles (singular: the study's grid, centre index len // 2); "
     "IMBH to full-rank: to the full-rank run of the same seed; the full-rank row shows the seed baseline (the barrier "
     "between full-rank runs of different seeds: mean [min, max] over the seed pairs) instead of its barrier with "
     "itself; Hessian: the largest and the smallest (most negative) algebraic eigenvalue by Lanczos and the trace by "
     "Hutchinson, on Hessian-vector products of the probe loss (docs/metrics.md); † where an estimate did not converge."),
    ("Spectra",
     ["effective_rank_w", "stable_rank_w", "numerical_rank_ratio_w", "sv_ratio_w", "effective_rank_w_merged",
      "effective_rank_dw", "update_ratio_pooled"],
     "W is every native 2-D matrix of the attention and MLP modules, each counted once (the study's: a factored "
     "layer contributes its factors, LoRA/ReLoRA its base and factors); merged W is each layer's effective dense "
     "weight (ours). ΔW between the last two checkpoints; the pooled ratio is √Σ‖ΔW‖² / √Σ‖W‖² over all matrices."),
    ("Activations",
     ["cka_last_layer", "cka_to_reference", "cosine_to_reference", "relative_l2_to_reference", "activation_norm"],
     "Hidden states on the probe set against the full-rank run of the same scale and seed; the full-rank row shows "
     "the seed baseline (the same metric between full-rank runs of different seeds: mean [min, max] over the seed "
     "pairs) instead of the comparison with itself. The last layer is the output of the final RMSNorm, as HF "
     "hidden_states (the study's)."),
]
GEOMETRY_COLUMNS = [c for _, columns, _ in GEOMETRY_TABLES for c in columns]


def results_table(runs: pd.DataFrame, preset: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(numeric table for CSV, formatted table for the report) of one preset: one row per method,
    controls last and marked (reference rows: they are shown, never ranked)."""
    rows, shown = [], []
    in_preset = runs[runs["preset"].astype(str) == str(preset)]
    for method in sorted_methods(in_preset["method"].dropna().unique()):
        group = in_preset[in_preset["method"] == method]
        trained = group[finite(group["val_loss"])]
        failed = group[group["status"] == "failed"]
        row: dict[str, Any] = {"preset": preset, "method": method, "control": is_control(method),
                               "n_seeds": len(trained), "n_runs": len(group), "n_failed": len(failed)}
        for column in ("val_loss", "val_ppl", "downstream_acc", "tokens_per_sec"):
            row[f"{column}_mean"], row[f"{column}_std"], row[f"{column}_n"] = mean_std(trained[column].astype(float))
        for column in ("params", "trainable_params", "optimizer_state_bytes", "estimated_memory_bytes"):
            # Fixed by the architecture and method, so the same for every seed: one number.
            row[column] = mean_std(group[column].astype(float))[0]
        row["failed_runs"] = "; ".join(f"{r.run}: {r.failure_reason}" for r in failed.itertuples(index=False))
        rows.append(row)
        accuracy = mean_std(trained["downstream_acc"].astype(float) * 100)
        shown.append({
            "method": method_label(method),
            "seeds": f"{len(trained)}" + (f" ({len(failed)} failed)" if len(failed) else ""),
            "val loss": format_mean_std(row["val_loss_mean"], row["val_loss_std"], row["val_loss_n"]),
            "val ppl": format_mean_std(row["val_ppl_mean"], row["val_ppl_std"], row["val_ppl_n"]),
            "downstream acc [%]": format_mean_std(*accuracy, digits=3),
            "params [M]": format_cell(row["params"] / 1e6),
            "trainable [M]": format_cell(row["trainable_params"] / 1e6),
            "optimizer state [MiB]": format_cell(row["optimizer_state_bytes"] / MIB),
            "est. memory [MiB]": format_cell(row["estimated_memory_bytes"] / MIB),
            "tokens/s": format_mean_std(row["tokens_per_sec_mean"], row["tokens_per_sec_std"],
                                        row["tokens_per_sec_n"], digits=3),
            "failed runs (reason)": row["failed_runs"] or "",
        })
    return pd.DataFrame(rows), pd.DataFrame(shown)


def _reasons(group: pd.DataFrame, column: str = "not_applicable") -> dict[str, str]:
    """``{feature: reason}`` of the features listed in ``column`` for any run of ``group``."""
    reasons: dict[str, str] = {}
    for text in group.get(column, pd.Series(dtype=str)):
        for feature, reason in parse_reasons(text).items():
            reasons.setdefault(feature, reason)
    return reasons


def geometry_table(features: pd.DataFrame, preset: str, columns: list[str] | None = None,
                   reference_cells: dict[str, str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Final-checkpoint metrics per method: mean ± std over seeds (formatted), ``n/a`` where a
    metric does not apply to the method; and one line per such cell with the reason.
    ``reference_cells`` replaces cells of the full-rank row (its seed baseline)."""
    in_preset = features[features["preset"].astype(str) == str(preset)]
    wanted = GEOMETRY_COLUMNS if columns is None else columns
    reference_cells = reference_cells or {}
    shown = [c for c in wanted if c in in_preset.columns and finite(in_preset[c]).any()]
    rows, notes = [], []
    for method in sorted_methods(in_preset["method"].dropna().unique()):
        group = in_preset[in_preset["method"] == method]
        reasons = _reasons(group)
        row = {"method": method_label(method)}
        for column in shown:
            values = group[column].astype(float)
            if method == REFERENCE_METHOD and column in reference_cells:
                row[METRIC_LABELS[column]] = reference_cells[column]
            elif not finite(values).any() and column in reasons:
                row[METRIC_LABELS[column]] = "n/a"
                notes.append(f"{method}, {METRIC_LABELS[column]}: not applicable — {reasons[column]}")
            else:
                row[METRIC_LABELS[column]] = format_mean_std(*mean_std(values))
                unconverged = [parse_reasons(text).get(column) for text in group.get("unconverged", [])]
                flagged = [reason for reason in unconverged if reason]
                if flagged and finite(values).any():
                    row[METRIC_LABELS[column]] += f" {UNCONVERGED_MARK}"
                    notes.append(f"{method}, {METRIC_LABELS[column]}: {UNCONVERGED_MARK} {len(flagged)} of {len(group)} "
                                 f"runs did not converge — {flagged[0]}; shown, never tested or stated as a finding")
        rows.append(row)
    return pd.DataFrame(rows), notes


def _comparison_cell(row: pd.Series | None) -> str:
    """mean ± std over the comparisons, and their number."""
    if row is None or not row["n"]:
        return "–"
    spread = f" ± {format_number(row['std'], 2)}" if row["n"] >= 2 else ""
    return f"{format_number(row['mean'])}{spread} (n = {int(row['n'])})"


def _reading_cell(row: pd.Series | None) -> str:
    if row is None or not row["n"] or not row["reading"]:
        return "–"
    reading = str(row["reading"]).replace(" than seed baseline", "").replace(" seed baseline", "")
    if np.isfinite(row["outside_baseline"]):
        reading += f" ({int(row['outside_baseline'])}/{int(row['n'])} outside)"
    return reading


def baseline_display(final_table: pd.DataFrame, measure: str, reference_cell: str) -> pd.DataFrame:
    """One final-checkpoint measure per method: the comparison with the full-rank run of the same
    seed and of the other seeds, each with its difference to the seed-baseline mean and its
    reading; the full-rank row holds the baseline itself (full vs a full-rank run of another seed)."""
    rows = final_table[final_table["metric"] == measure]
    shown = [{"method": f"{REFERENCE_METHOD} (seed baseline)", "same seed": "– (itself)", "other seed": reference_cell,
              "Δ to baseline: same / other seed": "", "reading: same seed": "", "reading: other seed": ""}]
    for method in [m for m in dict.fromkeys(final_table["method"]) if m != REFERENCE_METHOD]:
        pick = {p: next((r for _, r in rows[(rows["method"] == method) & (rows["pairing"] == p)].iterrows()), None)
                for p in ("same-seed", "cross-seed")}
        differences = [format_number(r["difference_to_baseline"], 3) if r is not None and r["n"] else "–"
                       for r in pick.values()]
        shown.append({"method": method_label(method), "same seed": _comparison_cell(pick["same-seed"]),
                      "other seed": _comparison_cell(pick["cross-seed"]),
                      "Δ to baseline: same / other seed": " / ".join(differences),
                      "reading: same seed": _reading_cell(pick["same-seed"]),
                      "reading: other seed": _reading_cell(pick["cross-seed"])})
    return pd.DataFrame(shown)


def predictor_display(predictor: pd.DataFrame) -> pd.DataFrame:
    shown = pd.DataFrame({"feature set": predictor.get("feature_set")})
    for score, label in (("r2_in_sample", "in-sample R²"), ("loso_pearson", "LOSO r"), ("lomo_pearson", "LOMO r")):
        if score not in predictor.columns:
            continue
        values = pd.to_numeric(predictor[score], errors="coerce")
        spread = pd.to_numeric(predictor[f"{score}_std"], errors="coerce") if f"{score}_std" in predictor.columns else None
        texts = []
        for index, value in values.items():
            if not np.isfinite(value):
                texts.append("n/a")
            elif spread is not None and np.isfinite(spread[index]):
                texts.append(f"{value:.3f} (± {spread[index]:.3f} over seeds)")
            else:
                texts.append(f"{value:.3f}")
        shown[label] = texts
    for column in ("n_rows", "note"):
        if column in predictor.columns:
            shown[column.replace("_", " ")] = predictor[column].fillna("").astype(str) if column == "note" else predictor[column]
    return shown


def print_results_table(study_dir: str | Path) -> None:
    """Print the results table of every scale to the terminal (what `rankscope study` and
    `rankscope demo` show when they finish) with the unigram / chance baselines as its last row,
    the regime in one line, whether the regime can separate the methods at all (the control's
    verdict), what the corrected tests allow to say about the order of the methods,
    and the failed runs with their reasons."""
    import sys

    from rich.console import Console
    from rich.table import Table

    from rankscope.report.informativeness import study_verdicts
    from rankscope.report.regime import baseline_row, regime_summary, study_regime
    from rankscope.report.significance import ranking_words, study_comparison

    study = load_study(study_dir)
    regime = study_regime(study)
    comparison = study_comparison(study, METRIC_LABELS)
    verdicts = study_verdicts(study)
    # Piped output (logs, CI) gets a wide console so rows are not wrapped into unreadable cells.
    console = Console(width=None if sys.stdout.isatty() else 200)
    shown_columns = ["method", "seeds", "val loss", "val ppl", "downstream acc [%]", "params [M]",
                     "optimizer state [MiB]", "tokens/s"]
    for preset in study.presets():
        _, shown = results_table(study.runs, preset)
        table = Table(title=f"{Path(study_dir).name}: scale {preset} (mean ± std over seeds; alphabetical, not ranked)")
        for column in shown_columns:
            table.add_column(column, justify="left" if column == "method" else "right")
        for row in shown[shown_columns].itertuples(index=False):
            table.add_row(*(str(value) for value in row))
        baseline = baseline_row(regime, preset)
        table.add_row(*(baseline.get(column, "") for column in shown_columns), style="dim")
        console.print(table)
        lines = [regime_summary(regime, preset), verdicts[preset].ranking_caveat(),
                 *ranking_words(comparison, preset, regime, METRIC_LABELS)]
        for line in lines:
            console.print(line.replace("**", ""), markup=False, highlight=False)
    failed = study.runs[study.runs["status"] == "failed"]
    for row in failed.itertuples(index=False):
        console.print(f"failed: {row.run}: {row.failure_reason}", markup=False, highlight=False)
