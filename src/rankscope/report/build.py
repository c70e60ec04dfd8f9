"""Build STUDY_DIR/report/: report.md, a self-contained report.html, figures/*.png, tables/*.csv.

The report is assembled once as a :class:`~rankscope.report.document.Document` and rendered to
Markdown and HTML; its tables come from :mod:`.tables`, its figures from :mod:`.figures`.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path

from rankscope.report.collect import Study, finite, load_study, run_features, sorted_methods
from rankscope.report.document import Document, render_html, render_markdown
from rankscope.report.figures import FigureResult, render_all
from rankscope.report.stats import compare_to_reference
from rankscope.report.tables import (
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
        geometry = geometry_table(features, preset)
        if len(geometry.columns) > 1:
            geometry.to_csv(tables_dir / f"geometry_{preset}.csv", index=False)
            document.heading("Final-checkpoint geometry", 3)
            document.table(geometry, "Mean ± std over seeds at each run's last analysed checkpoint. IMBH to "
                                     "full-rank of the full-rank row: the barrier between its own seeds "
                                     "(the seed-to-seed baseline); – where not applicable.")
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
