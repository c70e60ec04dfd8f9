"""Build STUDY_DIR/report/: report.md, a self-contained report.html, figures/*.png, tables/*.csv.

The report is assembled once as a :class:`~rankscope.report.document.Document` and rendered to
Markdown and HTML; its tables come from :mod:`.tables`, its figures from :mod:`.figures`.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path

from rankscope.report.collect import Study, finite, load_study, sorted_methods
from rankscope.report.features import run_features
from rankscope.report.document import Document, render_html, render_markdown
from rankscope.report.figures import FigureResult, render_all
from rankscope.report.stats import compare_to_reference
from rankscope.report.tuning import tuning_section
from rankscope.report.tables import (
    GEOMETRY_TABLES,
    METRIC_LABELS,
    _predictor_display,
    _significance_display,
    _significance_words,
    geometry_table,
    results_table,
)

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


def _study_name(study: Study) -> str:
    """The `name` of the resolved study.yaml, else the folder name."""
    path = study.study_dir / "study.yaml"
    if path.is_file():
        import yaml

        try:
            name = (yaml.safe_load(path.read_text()) or {}).get("name")
        except (OSError, yaml.YAMLError, AttributeError):
            name = None
        if name:
            return str(name)
    return study.study_dir.name


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

    features = run_features(study)
    metrics = [m for m in METRIC_LABELS if m in features.columns]
    # A run that has a summary.json finished training, so its numbers count even if a later stage
    # (analysis, eval) failed; the same rule as the results table.
    usable = features[finite(features["val_loss"])]
    comparison = compare_to_reference(usable, metrics)
    figures = render_all(study, figures_dir)

    extra = [c for c in features.columns if c not in study.runs.columns]
    study.runs.merge(features[["run", *extra]], on="run", how="left").to_csv(tables_dir / "runs.csv", index=False)
    comparison.to_csv(tables_dir / "significance.csv", index=False)
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
    definitions = _definitions(study)
    if definitions:
        document.heading("Definitions used")
        document.paragraph("Where the study's code and rankscope define a metric differently, the study's definition is "
                           "the default and ours a named setting (docs/metrics.md). These tables use:")
        document.bullets(definitions)
    tuning_section(document, study.study_dir, figures_dir, tables_dir)
    skipped_lines: list[str] = []
    for preset in study.presets():
        numeric, shown = results_table(study.runs, preset)
        numeric.to_csv(tables_dir / f"results_{preset}.csv", index=False)
        document.heading(f"Scale {preset}")
        document.heading("Results", 3)
        document.table(shown, "Final checkpoint. Optimizer state: bytes of the optimizer's state tensors; "
                              "est. memory: weights + optimizer state at 2 bytes/element (literature convention).")
        failed_here = failed[failed["preset"].astype(str) == str(preset)]
        if len(failed_here):
            document.paragraph("Failed runs: " + "; ".join(f"`{r.run}` — {r.failure_reason}"
                                                           for r in failed_here.itertuples(index=False)))
        geometry, _ = geometry_table(features, preset)
        if len(geometry.columns) > 1:
            geometry.to_csv(tables_dir / f"geometry_{preset}.csv", index=False)
            document.heading("Final-checkpoint geometry", 3)
            document.paragraph("Mean ± std over seeds at each run's last analysed checkpoint; – where a run has no "
                               "value, n/a where the metric does not apply to the method (reason below).")
            for title, columns, caption in GEOMETRY_TABLES:
                table, not_applicable = geometry_table(features, preset, columns)
                if len(table.columns) > 1:
                    document.heading(title, 4)
                    document.table(table, caption)
                    document.bullets(not_applicable)
        document.heading("Does the difference to full-rank exceed seed-to-seed variation?", 3)
        in_preset = usable[usable["preset"].astype(str) == str(preset)]
        seed_counts = {m: int(finite(in_preset.loc[in_preset["method"] == m, "val_loss"]).sum())
                       for m in sorted_methods(in_preset["method"].dropna().unique())}
        document.bullets(_significance_words(comparison, preset, seed_counts))
        display = _significance_display(comparison, preset)
        if len(display):
            document.table(display, "Difference = mean(method) − mean(full) over seeds, per metric.")
        document.heading("Figures", 3)
        _figure_blocks(document, figures.get(preset, []), skipped_lines)

    document.heading("Predicting downstream accuracy")
    if study.predictor is not None and not study.predictor.empty:
        document.table(_predictor_display(study.predictor),
                       "Ridge regression on standardized features; n/a: not computable (reason in the note).")
    _figure_blocks(document, figures.get("", []), skipped_lines)

    if skipped_lines or study.notes:
        document.heading("Missing data")
        document.bullets(skipped_lines + study.notes)

    title = f"rankscope study report — {_study_name(study)}"
    (out / "report.md").write_text(render_markdown(document, title))
    (out / "report.html").write_text(render_html(document, title))
    log.info("report written to %s", out)
    return out


__all__ = ["METRIC_LABELS", "build_report", "geometry_table", "render_html", "render_markdown", "results_table"]
