"""Build STUDY_DIR/report/: report.md, a self-contained report.html, figures/*.png, tables/*.csv.

The report is assembled once as a :class:`~rankscope.report.document.Document` and rendered to
Markdown and HTML; its tables come from :mod:`.tables`, its figures from :mod:`.figures`.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path

import pandas as pd

from rankscope.report.baseline import FINAL_MEASURES, MEASURE_LABELS, SPREAD, SeedBaselines
from rankscope.report.collect import REFERENCE_METHOD, Study, load_study
from rankscope.report.document import Document, render_html, render_markdown
from rankscope.report.dynamics import dynamics_section
from rankscope.report.figures import FigureResult, render_all
from rankscope.report.figures.significance import fig_significance_map
from rankscope.report.findings import ScaleEvidence, findings
from rankscope.report.informativeness import study_verdicts, verdict_table
from rankscope.report.intruder import intruder_section
from rankscope.report.regime import baseline_row, regime_display, regime_glance, regime_lines, study_regime
from rankscope.report.run_features import converged_only, run_features
from rankscope.report.significance import (
    comparison_display,
    family_statement,
    ranking_words,
    study_comparison,
    tuning_statement,
)
from rankscope.report.significance_map import LEGEND, map_display, significance_map
from rankscope.report.stats import NO_VALUES
from rankscope.report.tables import (
    GEOMETRY_TABLES,
    METRIC_LABELS,
    UNCONVERGED_MARK,
    baseline_display,
    geometry_table,
    predictor_display,
    results_table,
)
from rankscope.report.tuning import tuning_section

log = logging.getLogger("rankscope.report")


def _figure_blocks(document: Document, results: list[FigureResult], skipped_lines: list[str]) -> None:
    for result in results:
        if result.path is not None:
            document.figure(result)
        else:
            line = f"{result.title}: not drawn — {result.skipped}"
            document.paragraph(f"*Figure skipped — {line}*")
            skipped_lines.append(line)


# setting -> (what it decides, {value: meaning}); the first value is the study's (the default).
DEFINITIONS: dict[str, tuple[str, dict[str, str]]] = {
    "loss_average": ("Probe loss (landscapes, barriers, Hessian)", {
        "batch_mean": "mean of per-batch mean losses (the study's)", "token": "exact token-weighted mean (ours)"}),
    "singular_grid": ("Singular-direction grid", {
        "study": "numpy.arange{grid}, sharpness around index len // 2 (the study's grid family)",
        "centered": "symmetric around α = 0 (ours)"}),
    "singular_beyond_rank": ("Singular direction k beyond a matrix's components", {
        "clamp": "reuses its last component (the study's)", "zero": "perturbs nothing (ours)"}),
    "zero_matrix_gap": ("Spectral gap and σ₂/σ₁ of an all-zero matrix", {"zero": "0 (the study's)", "nan": "undefined (ours)"}),
    "last_hidden": ("Last layer's activations", {
        "final_norm": "after the final RMSNorm, as HF hidden_states (the study's)", "block_output": "raw last block output (ours)"}),
}


def _definitions(study: Study) -> list[str]:
    """What the tables' numbers mean where the study's code and ours differ, from the runs' meta.json."""
    lines = []
    for setting, (label, meanings) in DEFINITIONS.items():
        counts: dict[str, int] = {}
        for meta in study.analysis_meta.values():
            settings = meta.get("settings") or {}
            value = settings.get(setting)
            if value is not None:
                grid = tuple(settings.get("singular_study_grid") or (-0.05, 0.0501, 0.004))
                text = f"{meanings.get(str(value), str(value)).format(grid=grid)} (`{setting}={value}`"
                counts[text] = counts.get(text, 0) + 1
        if counts:
            parts = [text + (f", {n} runs)" if len(counts) > 1 else ")") for text, n in counts.items()]
            lines.append(f"{label}: " + "; ".join(parts) + ".")
    return lines


def _study_file(study: Study) -> dict:
    """The resolved study.yaml ({} when absent or unreadable)."""
    import yaml

    path = study.study_dir / "study.yaml"
    try:
        loaded = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (OSError, yaml.YAMLError):
        loaded = {}
    return loaded if isinstance(loaded, dict) else {}


def _families_left_out(study: Study) -> list[str]:
    """The analysis families the study chose not to compute (its analysis.metrics), said once."""
    from rankscope.analysis.settings import FAMILIES

    chosen = (_study_file(study).get("analysis") or {}).get("metrics")
    if not isinstance(chosen, list):
        return []
    left_out = [family for family in FAMILIES if family not in chosen]
    return [f"Not analysed in this study (its `analysis.metrics` leaves {', '.join(left_out)} out; the study file says "
            f"why): no {', '.join(left_out)} values in any table. `rankscope analyze RUNS --metrics "
            f"{','.join(left_out)}` computes them."] if left_out else []


def _study_name(study: Study) -> str:
    """The `name` of the resolved study.yaml, else the folder name."""
    return str(_study_file(study).get("name") or study.study_dir.name)


def _baseline_section(document: Document, baselines: SeedBaselines, preset: str, tables_dir: Path) -> None:
    """Every distance to full rank next to the distance between two full-rank seeds (collapsed: the
    map and the findings summarise it; a reference to its tables opens it)."""
    with document.section("Distance from full rank against the full-rank seed baseline", 3,
                          anchor=f"distance-section-{preset}", open_=False):
        _baseline_tables(document, baselines, preset, tables_dir)


def _baseline_tables(document: Document, baselines: SeedBaselines, preset: str, tables_dir: Path) -> None:
    missing = baselines.missing(preset)
    if missing:
        document.paragraph(f"**The seed baseline is missing at this scale:** {missing}. Without it, a distance to full "
                           "rank cannot be told apart from the distance between two full-rank runs that differ only "
                           "in their seed, so the values below have no yardstick.")
    document.paragraph(
        "Each low-rank run is compared with the full-rank run of its own seed (**same seed**: shared initialisation and "
        "data order) and with the full-rank runs of the other seeds (**other seed**). The **seed baseline** is the same "
        "metric between full-rank runs of different seeds, every pair of seeds at the same checkpoint (relative L2 once "
        f"per direction, since it divides by the reference's norm); its spread is the range, {SPREAD}. "
        "*within*: inside that range, as close to full rank as another full-rank seed; *farther* / *closer*: outside it "
        "(CKA and cosine: higher is closer; L2 and barriers: lower is closer), judged on the mean, with the number of "
        "single comparisons outside the range. The other-seed comparison is the one that matches the baseline; the "
        "same-seed one shows what a shared initialisation and data order add. Values at the last analysed checkpoint; "
        f"every checkpoint and layer in tables/seed_baseline_{preset}.csv.")
    final = baselines.final_table(preset)
    pairs = final.loc[final["pairing"] == "seed baseline", "baseline_pairs"]
    if not missing and len(pairs) and int(pairs.min()) == 1:
        document.paragraph("With two full-rank seeds there is one seed pair, so the range is a single value: *farther* "
                           "or *closer* then only says on which side of that one pair a value lies, not that it is "
                           "beyond seed-to-seed variation; three seeds give three pairs and a range.")
    final.to_csv(tables_dir / f"distance_to_full_{preset}.csv", index=False)
    baselines.layer_table(preset).to_csv(tables_dir / f"seed_baseline_{preset}.csv", index=False)
    for measure in FINAL_MEASURES:
        if not (final[final["metric"] == measure]["n"] > 0).any() and missing:
            continue
        display = baseline_display(final, measure, baselines.final_baseline(preset, measure).cell())
        if len(display) > 1 or not missing:
            first = f"distance-{preset}" if f"distance-{preset}" not in document.references() else None
            document.table(display, f"{MEASURE_LABELS[measure]} (mean ± std over the comparisons, n of them); Δ: "
                                    "mean minus the seed-baseline mean.", label=first)


def _scale_section(document: Document, study: Study, preset: str, features: pd.DataFrame, converged: pd.DataFrame,
                   comparison: pd.DataFrame,
                   exclusions: pd.DataFrame, regime, verdicts, baselines: SeedBaselines, figures, failed: pd.DataFrame,
                   figures_dir: Path, tables_dir: Path, skipped_lines: list[str]) -> ScaleEvidence:
    """One scale's section: its significance map first, then the regime, results, geometry, distances,
    ranking and figures the map and the findings point to."""
    metrics = [m for m in METRIC_LABELS if m != "val_ppl" and m in features.columns]
    cells = significance_map(comparison, converged, baselines, preset, metrics, exclusions)
    cells.to_csv(tables_dir / f"significance_map_{preset}.csv", index=False)
    shown_metrics = [m for m in metrics if not (cells[cells["metric"] == m]["cell"] == NO_VALUES).all()]
    cells = cells[cells["metric"].isin(shown_metrics)]
    document.heading("Significance map", 3, anchor=f"sigmap-section-{preset}")
    result = fig_significance_map(cells, METRIC_LABELS, preset, figures_dir, LEGEND)
    if result.path is not None:
        document.figure(result, label=f"sigmap-{preset}")
        table, styles = map_display(cells, METRIC_LABELS)
        with document.section("The map as a table", 4, anchor=f"sigmap-table-section-{preset}", open_=False):
            document.table(table, "The same map as a table. " + LEGEND + " Every cell with its p-value: "
                           f"tables/significance_map_{preset}.csv.", label=f"sigmap-table-{preset}", cell_styles=styles)
    else:
        document.paragraph(f"*No significance map — {result.skipped}.*")

    document.heading("Regime", 3, anchor=f"regime-{preset}")
    document.table(regime_display(regime, preset), label=f"regime-{preset}")
    document.bullets(regime_lines(regime, preset, study))
    document.paragraph(tuning_statement(regime, preset))

    numeric, shown = results_table(study.runs, preset)
    numeric.to_csv(tables_dir / f"results_{preset}.csv", index=False)
    document.heading("Results", 3, anchor=f"results-section-{preset}")
    shown = pd.concat([shown, pd.DataFrame([baseline_row(regime, preset)])], ignore_index=True).fillna("")
    document.table(shown, "Final checkpoint; methods in alphabetical order (full rank first), not in rank order; "
                          "controls (marked) after them, reference rows that are never tested or ranked. "
                          "Last row: the validation split's unigram perplexity and the chance level of the mean "
                          "downstream accuracy. Optimizer state: bytes of the optimizer's state tensors; "
                          "est. memory: weights + optimizer state at 2 bytes/element (literature convention).",
                   label=f"results-{preset}")
    failed_here = failed[failed["preset"].astype(str) == str(preset)]
    if len(failed_here):
        document.paragraph("Failed runs: " + "; ".join(f"`{r.run}` — {r.failure_reason}"
                                                       for r in failed_here.itertuples(index=False)))
    missing = baselines.missing(preset)
    reference_cells = {m: baselines.final_baseline(preset, m).cell() for m in FINAL_MEASURES}
    geometry, _ = geometry_table(features, preset, reference_cells=reference_cells)
    if len(geometry.columns) > 1:
        geometry.to_csv(tables_dir / f"geometry_{preset}.csv", index=False)
        with document.section("Final-checkpoint geometry", 3, anchor=f"geometry-{preset}", open_=False):
            document.paragraph("Mean ± std over seeds at each run's last analysed checkpoint; – where a run has no "
                               f"value, n/a where the metric does not apply to the method, {UNCONVERGED_MARK} where an "
                               "estimate did not converge (reasons below each table).")
            for title, columns, caption in GEOMETRY_TABLES:
                table, notes = geometry_table(features, preset, columns, reference_cells)
                if len(table.columns) > 1:
                    document.heading(title, 4)
                    document.table(table, caption)
                    if missing and any(METRIC_LABELS[m] in table.columns for m in FINAL_MEASURES):
                        notes = [f"{REFERENCE_METHOD}: the seed baseline is missing — {missing}.", *notes]
                    document.bullets(notes)
    _baseline_section(document, baselines, preset, tables_dir)
    intruder_section(document, study, preset, tables_dir)
    document.heading("Ranking", 3, anchor=f"ranking-{preset}")
    document.paragraph(verdicts[preset].ranking_caveat())
    document.bullets(ranking_words(comparison, preset, regime, METRIC_LABELS))
    document.heading("Figures", 3, anchor=f"figures-{preset}")
    _figure_blocks(document, figures.get(preset, []), skipped_lines)
    dynamics_section(document, study, preset, figures_dir, tables_dir, skipped_lines)
    return ScaleEvidence(preset, cells, numeric, regime)


def _appendix(document: Document, comparison: pd.DataFrame, regime, presets: list[str]) -> None:
    """Every test of the family, collapsed: the findings and the maps summarise it."""
    with document.section("Appendix: every test", anchor="appendix-tests", open_=False):
        document.paragraph(family_statement(comparison) + " Distances to full rank (CKA, cosine, relative L2, IMBH) "
                           "are not in this family: the full-rank row's comparison with itself is no yardstick; they "
                           "are read against the seed baseline.")
        display = pd.concat([comparison_display(comparison, preset, METRIC_LABELS).assign(scale=preset)
                             for preset in presets], ignore_index=True) if presets else pd.DataFrame()
        if len(display):
            display = display[["scale", *[c for c in display.columns if c != "scale"]]]
            document.table(display, "Each method against full rank on every tested metric. Difference = mean(method) − "
                                    "mean(full) over seeds. val ppl is exp(val loss) run by run, so it is tested as val "
                                    "loss. Welch's CI of each difference and the pairs of methods: "
                                    "tables/significance.csv.", label="tests")


def build_report(study_dir: str | Path) -> Path:
    """Write STUDY_DIR/report/{report.md, report.html, figures/*.png, tables/*.csv}; returns the
    report folder."""
    study = load_study(study_dir)
    out = study.study_dir / "report"
    figures_dir, tables_dir = out / "figures", out / "tables"
    for folder in (figures_dir, tables_dir):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():  # a re-run must not keep figures of data that is gone
            if stale.is_file() and stale.suffix in (".png", ".csv"):
                stale.unlink()

    baselines = SeedBaselines(study)
    features = run_features(study, baselines)
    # Estimates whose estimator did not converge are shown (marked) but never tested or stated.
    converged, exclusions = converged_only(features)
    comparison = study_comparison(study, METRIC_LABELS, converged)
    regime = study_regime(study)
    verdicts = study_verdicts(study)
    figures = render_all(study, figures_dir, baselines)

    extra = [c for c in features.columns if c not in study.runs.columns]
    study.runs.merge(features[["run", *extra]], on="run", how="left").to_csv(tables_dir / "runs.csv", index=False)
    comparison.to_csv(tables_dir / "significance.csv", index=False)
    regime.table.drop(columns="lr_choices").to_csv(tables_dir / "regime.csv", index=False)
    regime.chance.to_csv(tables_dir / "chance.csv", index=False)
    verdict_table(verdicts).to_csv(tables_dir / "informativeness.csv", index=False)
    failed = study.runs[study.runs["status"] == "failed"][["run", "method", "preset", "seed", "failure_reason"]]
    failed.to_csv(tables_dir / "failed_runs.csv", index=False)
    if study.predictor is not None:
        study.predictor.to_csv(tables_dir / "predictor.csv", index=False)

    document = Document()
    n_done = int((study.runs["status"] == "done").sum())
    document.paragraph(
        f"Study folder `{study.study_dir}`; {len(study.runs)} runs ({n_done} done, {len(failed)} failed, "
        f"{len(study.runs) - n_done - len(failed)} other) over scales {', '.join(study.presets()) or '–'}. "
        f"Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}. Numbers are mean ± sample std over seeds; "
        "validation perplexity is exp of the exact token-weighted mean next-token loss on the validation set.")
    document.heading("Regime and verdict", anchor="regime")
    for preset in study.presets():
        # Before any result: what was trained, and whether this regime can tell the methods apart at all.
        document.paragraph(regime_glance(regime, preset) + " " + verdicts[preset].sentence())
    findings_at = len(document.blocks)  # the findings go here once every table and figure has its number

    skipped_lines: list[str] = []
    scales: list[ScaleEvidence] = []
    for preset in study.presets():
        with document.section(f"Scale {preset}", anchor=f"scale-{preset}"):
            scales.append(_scale_section(document, study, preset, features, converged, comparison, exclusions, regime, verdicts,
                                         baselines, figures, failed, figures_dir, tables_dir, skipped_lines))

    definitions = _definitions(study)
    if definitions:
        document.heading("Definitions used")
        document.paragraph("Where the study's code and rankscope define a metric differently, the study's definition is "
                           "the default and ours a named setting (docs/metrics.md). These tables use:")
        document.bullets(definitions)
    tuning_section(document, study.study_dir, figures_dir, tables_dir)
    document.heading("Predicting downstream accuracy")
    if study.predictor is not None and not study.predictor.empty:
        document.table(predictor_display(study.predictor),
                       "Ridge regression on standardized features; n/a: not computable (reason in the note). "
                       "No test of whether a score differs from 0 is made, so a score describes these n rows; "
                       "it is not evidence of predictive power.", label="predictor")
    _figure_blocks(document, figures.get("", []), skipped_lines)
    _appendix(document, comparison, regime, study.presets())
    missing_lines = _families_left_out(study) + skipped_lines + study.notes + regime.notes
    if missing_lines:
        document.heading("Missing data")
        document.bullets(missing_lines)

    labels = set(document.references())
    found = findings(scales, comparison, study.predictor, exclusions, METRIC_LABELS,
                     lambda label: f"[[{label}]]" if label in labels else "")
    document.insert_findings(findings_at, found)

    title = f"rankscope study report — {_study_name(study)}"
    (out / "report.md").write_text(render_markdown(document, title))
    (out / "report.html").write_text(render_html(document, title))
    log.info("report written to %s", out)
    return out


__all__ = ["METRIC_LABELS", "build_report", "geometry_table", "render_html", "render_markdown", "results_table"]
