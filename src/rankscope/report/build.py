"""Build STUDY_DIR/report/: report.md, a self-contained report.html, figures/*.png, tables/*.csv.

The report is assembled once as a list of blocks (heading, paragraph, list, table, figure) and
rendered twice, to Markdown and to HTML, so both always say the same thing.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rankscope.report.collect import REFERENCE_METHOD, Study, finite, load_study, run_features, sorted_methods
from rankscope.report.figures import FigureResult, render_all
from rankscope.report.stats import NEEDS_SEEDS, compare_to_reference, format_mean_std, format_number, mean_std

log = logging.getLogger("rankscope.report")

MIB = 1024.0 ** 2

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
    "effective_rank_w": "effective rank of W",
    "stable_rank_w": "stable rank of W",
    "effective_rank_dw": "effective rank of ΔW",
    "cka_to_reference": "CKA to full-rank (mean over layers)",
    "cosine_to_reference": "cosine to full-rank (mean over layers)",
    "relative_l2_to_reference": "relative L2 to full-rank (mean over layers)",
}
GEOMETRY_COLUMNS = [c for c in METRIC_LABELS if c not in ("val_loss", "val_ppl", "downstream_acc")]


# --- the document model ----------------------------------------------------------------------------


@dataclass
class Block:
    kind: str               # heading | paragraph | list | table | figure
    content: Any
    level: int = 2


class Document:
    def __init__(self) -> None:
        self.blocks: list[Block] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(Block("heading", text, level))

    def paragraph(self, text: str) -> None:
        self.blocks.append(Block("paragraph", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(Block("list", items))

    def table(self, frame: pd.DataFrame, caption: str = "") -> None:
        self.blocks.append(Block("table", (frame, caption)))

    def figure(self, result: FigureResult) -> None:
        self.blocks.append(Block("figure", result))


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return format_number(value)
    return str(value)


def _markdown_table(frame: pd.DataFrame) -> str:
    def escape(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(escape(str(c)) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(escape(_cell(v)) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def render_markdown(document: Document, title: str) -> str:
    lines = [f"# {title}", ""]
    for block in document.blocks:
        if block.kind == "heading":
            lines += ["#" * block.level + " " + block.content, ""]
        elif block.kind == "paragraph":
            lines += [block.content, ""]
        elif block.kind == "list":
            lines += [f"- {item}" for item in block.content] + [""]
        elif block.kind == "table":
            frame, caption = block.content
            if caption:
                lines += [f"*{caption}*", ""]
            lines += [_markdown_table(frame), ""]
        elif block.kind == "figure":
            result: FigureResult = block.content
            lines += [f"![{result.title}](figures/{result.path.name})", "", f"*{result.caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1250px;
       margin: 2em auto; padding: 0 1.2em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #333; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; padding-bottom: .15em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0 1.4em; font-size: 0.88em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .caption { color: #555; font-size: 0.9em; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def _inline_html(text: str) -> str:
    """Escape, then turn the two Markdown spans we use (**bold**, `code`) into HTML."""
    escaped = html.escape(text)
    parts = escaped.split("**")
    escaped = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = escaped.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html_table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def render_html(document: Document, title: str) -> str:
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for block in document.blocks:
        if block.kind == "heading":
            parts.append(f"<h{block.level}>{html.escape(block.content)}</h{block.level}>")
        elif block.kind == "paragraph":
            parts.append(f"<p>{_inline_html(block.content)}</p>")
        elif block.kind == "list":
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block.content) + "</ul>")
        elif block.kind == "table":
            frame, caption = block.content
            if caption:
                parts.append(f"<p class='caption'>{_inline_html(caption)}</p>")
            parts.append(_html_table(frame))
        elif block.kind == "figure":
            result: FigureResult = block.content
            encoded = base64.b64encode(result.path.read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(result.title, quote=True)}' "
                         f"src='data:image/png;base64,{encoded}'><figcaption>{_inline_html(result.caption)}"
                         f"</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --- tables ------------------------------------------------------------------------------------------


def results_table(runs: pd.DataFrame, preset: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(numeric table for CSV, formatted table for the report) of one preset: one row per method."""
    rows, shown = [], []
    in_preset = runs[runs["preset"].astype(str) == str(preset)]
    for method in sorted_methods(in_preset["method"].dropna().unique()):
        group = in_preset[in_preset["method"] == method]
        trained = group[finite(group["val_loss"])]
        failed = group[group["status"] == "failed"]
        row: dict[str, Any] = {"preset": preset, "method": method, "n_seeds": len(trained), "n_runs": len(group),
                               "n_failed": len(failed)}
        for column in ("val_loss", "val_ppl", "downstream_acc", "tokens_per_sec"):
            row[f"{column}_mean"], row[f"{column}_std"], row[f"{column}_n"] = mean_std(trained[column].astype(float))
        for column in ("params", "trainable_params", "optimizer_state_bytes", "estimated_memory_bytes"):
            # Fixed by the architecture and method, so the same for every seed: one number.
            row[column] = mean_std(group[column].astype(float))[0]
        row["failed_runs"] = "; ".join(f"{r.run}: {r.failure_reason}" for r in failed.itertuples(index=False))
        rows.append(row)
        accuracy = mean_std(trained["downstream_acc"].astype(float) * 100)
        shown.append({
            "method": method,
            "seeds": f"{len(trained)}" + (f" ({len(failed)} failed)" if len(failed) else ""),
            "val loss": format_mean_std(row["val_loss_mean"], row["val_loss_std"], row["val_loss_n"]),
            "val ppl": format_mean_std(row["val_ppl_mean"], row["val_ppl_std"], row["val_ppl_n"]),
            "downstream acc [%]": format_mean_std(*accuracy, digits=3),
            "params [M]": _cell(row["params"] / 1e6),
            "trainable [M]": _cell(row["trainable_params"] / 1e6),
            "optimizer state [MiB]": _cell(row["optimizer_state_bytes"] / MIB),
            "est. memory [MiB]": _cell(row["estimated_memory_bytes"] / MIB),
            "tokens/s": format_mean_std(row["tokens_per_sec_mean"], row["tokens_per_sec_std"],
                                        row["tokens_per_sec_n"], digits=3),
            "failed runs (reason)": row["failed_runs"] or "",
        })
    return pd.DataFrame(rows), pd.DataFrame(shown)


def geometry_table(features: pd.DataFrame, preset: str) -> pd.DataFrame:
    """Final-checkpoint geometry per method: mean ± std over seeds (formatted)."""
    in_preset = features[features["preset"].astype(str) == str(preset)]
    columns = [c for c in GEOMETRY_COLUMNS if c in in_preset.columns and finite(in_preset[c]).any()]
    rows = []
    for method in sorted_methods(in_preset["method"].dropna().unique()):
        group = in_preset[in_preset["method"] == method]
        row = {"method": method}
        for column in columns:
            row[METRIC_LABELS[column]] = format_mean_std(*mean_std(group[column].astype(float)))
        rows.append(row)
    return pd.DataFrame(rows)


def _significance_words(comparison: pd.DataFrame, preset: str, seed_counts: dict[str, int]) -> list[str]:
    """Plain-language statements: per method, which metrics differ from full-rank beyond
    seed-to-seed variation."""
    rows = comparison[comparison["preset"] == preset]
    if not seed_counts.get(REFERENCE_METHOD):
        return [f"No finished full-rank ({REFERENCE_METHOD}) run at this scale, so no method can be compared with it."]
    if rows.empty:
        return ["No other method has results at this scale to compare with full-rank."]
    assessable = rows[~rows["verdict"].isin(["cannot be assessed", "no values"])]
    if assessable.empty:
        counts = ", ".join(f"{m}: {n}" for m, n in seed_counts.items())
        return [f"Significance cannot be assessed at this scale: {NEEDS_SEEDS} (seeds with results — {counts}). "
                "The differences in the tables are single-seed observations and may be seed noise."]
    sentences = []
    for method, group in rows.groupby("method", sort=False):
        exceeds = group[group["verdict"] == "exceeds seed variation"]
        borderline = group[group["verdict"].str.startswith("borderline")]
        within = group[group["verdict"] == "within seed variation"]
        unassessed = group[group["verdict"] == "cannot be assessed"]
        undefined = group[group["verdict"].str.startswith("undefined")]
        no_values = group[group["verdict"] == "no values"]
        parts = []
        if len(exceeds):
            parts.append("differs beyond seed-to-seed variation on " + ", ".join(
                f"{METRIC_LABELS.get(r.metric, r.metric)} ({'+' if r.difference >= 0 else ''}{format_number(r.difference)}, "
                f"p = {format_number(r.p_value, 2)})" for r in exceeds.itertuples()))
        if len(borderline):
            parts.append("borderline (only one of Welch test / bootstrap CI rejects) on " +
                         ", ".join(METRIC_LABELS.get(m, m) for m in borderline["metric"]))
        if len(within):
            parts.append("stays within seed-to-seed variation on " +
                         ", ".join(METRIC_LABELS.get(m, m) for m in within["metric"]))
        if len(undefined):
            parts.append("shows no seed spread at all on " + ", ".join(METRIC_LABELS.get(m, m) for m in undefined["metric"]))
        if len(unassessed):
            parts.append("cannot be assessed (" + NEEDS_SEEDS + ") on " +
                         ", ".join(METRIC_LABELS.get(m, m) for m in unassessed["metric"]))
        if len(no_values):
            parts.append("cannot be compared on " + ", ".join(
                f"{METRIC_LABELS.get(r.metric, r.metric)} ({r.statement})" for r in no_values.itertuples()))
        sentences.append(f"**{method}** vs {REFERENCE_METHOD}: " + "; ".join(parts) + ".")
    sentences.append("Test: Welch's t-test (two-sided, α = 0.05) and a 95% percentile bootstrap CI of the difference "
                     "of means; 'differs' needs both. With few seeds the tests have little power: 'within seed "
                     "variation' means 'not shown to differ', not 'equal'.")
    return sentences


def _significance_display(comparison: pd.DataFrame, preset: str) -> pd.DataFrame:
    rows = comparison[comparison["preset"] == preset]
    return pd.DataFrame({
        "metric": [METRIC_LABELS.get(m, m) for m in rows["metric"]],
        "method": rows["method"],
        "seeds (method / full)": [f"{a} / {b}" for a, b in zip(rows["n_method"], rows["n_reference"])],
        "difference to full": rows["difference"],
        "95% bootstrap CI": [("–" if not np.isfinite(lo) else f"[{format_number(lo)}, {format_number(hi)}]")
                             for lo, hi in zip(rows["ci_low"], rows["ci_high"])],
        "Welch p": [format_number(p, 2) if np.isfinite(p) else "–" for p in rows["p_value"]],
        "verdict": [f"cannot be assessed: {NEEDS_SEEDS}" if v == "cannot be assessed" else
                    (statement if v == "no values" else v) for v, statement in zip(rows["verdict"], rows["statement"])],
    })


def _predictor_display(predictor: pd.DataFrame) -> pd.DataFrame:
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


# --- the report ------------------------------------------------------------------------------------------


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
