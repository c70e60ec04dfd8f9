"""The report document: numbered tables and figures, references resolved in both renderings (a
dangling one is an error), unique anchors, a table of contents, collapsible sections, findings
written last and read first."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from rankscope.report.document import Document, render_html, render_markdown, slug
from rankscope.report.figures import FigureResult


def _png(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1, 1))
    FigureCanvasAgg(figure)
    path = tmp_path / "f.png"
    figure.savefig(path)
    return FigureResult("f", "a figure", caption="What it shows, see [[first]].", path=path)


def _document(tmp_path) -> Document:
    document = Document()
    document.heading("Regime and verdict", anchor="regime")
    position = len(document.blocks)
    with document.section("Scale tiny", anchor="scale-tiny"):
        document.heading("Results", 3)
        document.table(pd.DataFrame({"method": ["full"], "val loss": [3.3]}), "Final values.", label="first")
        document.figure(_png(tmp_path), label="map")
        document.heading("Results", 3)  # a second heading of the same text gets its own anchor
        document.table(pd.DataFrame({"a": [1]}), "Second, after [[map]].")
    with document.section("Appendix", open_=False):
        document.paragraph("Closed by default.")
    document.insert_findings(position, [("Same solution?", ["**galore** differs ([[map]], [[first]])."])])
    return document


def test_tables_and_figures_are_numbered_in_order_and_references_resolve(tmp_path):
    document = _document(tmp_path)
    assert document.references() == {"first": "Table 1", "map": "Figure 1", "table-2": "Table 2"}
    markdown = render_markdown(document, "t")
    assert "- **galore** differs (Figure 1, Table 1)." in markdown
    assert "*Table 1. Final values.*" in markdown and "*Table 2. Second, after Figure 1.*" in markdown
    assert "*Figure 1. What it shows, see Table 1.*" in markdown
    # The findings were added last but stand where they were placed: before the scale's tables.
    assert markdown.index("## Findings") < markdown.index("### Same solution?") < markdown.index("## Scale tiny")
    html = render_html(document, "t")
    assert "<a href='#map'>Figure 1</a>, <a href='#first'>Table 1</a>" in html
    assert "<table id='first'>" in html and "<figure id='map'>" in html


def test_a_reference_to_a_missing_table_is_an_error(tmp_path):
    document = _document(tmp_path)
    document.paragraph("See [[nowhere]].")
    with pytest.raises(ValueError, match="nowhere"):
        render_html(document, "t")
    with pytest.raises(ValueError, match="nowhere"):
        render_markdown(document, "t")


def test_anchors_are_unique_and_the_contents_link_to_every_section(tmp_path):
    html = render_html(_document(tmp_path), "t")
    ids = re.findall(r"id='([^']+)'", html)
    assert len(ids) == len(set(ids))
    toc = html.split("<nav id='toc'>")[1].split("</nav>")[0]
    targets = re.findall(r"href='#([^']+)'", toc)
    assert targets == ["regime", "findings", "same-solution", "scale-tiny", "results", "results-2", "appendix"]
    assert all(target in ids for target in targets)
    assert slug("Do the methods reach the same solution as full rank?") == "do-the-methods-reach-the-same-solution-as-full-rank"


def test_sections_collapse_and_the_appendix_starts_closed(tmp_path):
    html = render_html(_document(tmp_path), "t")
    assert "<details open><summary><h2 id='scale-tiny'>Scale tiny</h2></summary>" in html
    assert "<details><summary><h2 id='appendix'>Appendix</h2></summary>" in html
    assert html.count("<details") == html.count("</details>") == 2


def test_cell_styles_reach_the_html_table_only():
    document = Document()
    frame = pd.DataFrame({"method": ["galore"], "d": ["+2.0*"]})
    styles = pd.DataFrame({"method": [""], "d": ["background:#ff0000"]})
    document.table(frame, "map", cell_styles=styles)
    html = render_html(document, "t")
    assert "<td>galore</td><td style='background:#ff0000'>+2.0*</td>" in html
    assert "background" not in render_markdown(document, "t")
