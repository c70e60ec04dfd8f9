"""The report as a list of blocks (heading, paragraph, list, table, figure, section), rendered twice,
to Markdown and to a self-contained HTML page (figures inlined as base64), so both always say the
same thing.

Every table and figure gets a number in the order it appears; a block added with a ``label`` can be
referenced from any text of the document, before or after it, as ``[[label]]`` (rendered "Table 3"
or "Figure 2", a link in HTML). Headings of level 2 and 3 get anchors and make the HTML table of
contents; a section opened with :meth:`Document.section` is collapsible in HTML.
"""

from __future__ import annotations

import base64
import contextlib
import html
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from rankscope.report.figures.base import FigureResult
from rankscope.report.stats import format_number

REFERENCE = re.compile(r"\[\[([A-Za-z0-9_.:-]+)\]\]")


@dataclass
class Block:
    kind: str               # heading | paragraph | list | table | figure | open | close
    content: Any
    level: int = 2
    label: str | None = None
    number: int | None = None
    extra: dict = field(default_factory=dict)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


class Document:
    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self._numbers = {"table": 0, "figure": 0}
        self._anchors: set[str] = set()

    def _anchor(self, wanted: str) -> str:
        anchor, n = wanted, 2
        while anchor in self._anchors:
            anchor, n = f"{wanted}-{n}", n + 1
        self._anchors.add(anchor)
        return anchor

    def _numbered(self, kind: str, content: Any, label: str | None, **extra) -> Block:
        self._numbers[kind] += 1
        number = self._numbers[kind]
        anchor = self._anchor(label or f"{kind}-{number}")
        block = Block(kind, content, label=anchor, number=number, extra=extra)
        self.blocks.append(block)
        return block

    def heading(self, text: str, level: int = 2, anchor: str | None = None) -> str:
        """Add a heading; returns its anchor (unique in the document)."""
        block = Block("heading", text, level, label=self._anchor(anchor or slug(text)))
        self.blocks.append(block)
        return block.label

    def paragraph(self, text: str) -> None:
        self.blocks.append(Block("paragraph", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(Block("list", items))

    def table(self, frame: pd.DataFrame, caption: str = "", label: str | None = None,
              cell_styles: pd.DataFrame | None = None) -> str:
        """Add a numbered table; ``cell_styles``: CSS per cell (same shape as ``frame``, HTML only).
        Returns its label."""
        return self._numbered("table", (frame, caption), label, cell_styles=cell_styles).label

    def figure(self, result: FigureResult, label: str | None = None) -> str:
        return self._numbered("figure", result, label).label

    @contextlib.contextmanager
    def section(self, title: str, level: int = 2, anchor: str | None = None, open_: bool = True) -> Iterator[str]:
        """A collapsible section (HTML ``<details>``) headed by ``title``; yields its anchor."""
        label = self._anchor(anchor or slug(title))
        self.blocks.append(Block("open", title, level, label=label, extra={"open": open_}))
        try:
            yield label
        finally:
            self.blocks.append(Block("close", None, level))

    def insert_findings(self, position: int, sections: list[tuple[str, list[str]]]) -> None:
        """Put the findings (question, statements) at ``position``: they are written last, once every
        table and figure they refer to has its number, and read first."""
        blocks = [Block("heading", "Findings", 2, label=self._anchor("findings"))]
        for question, statements in sections:
            blocks.append(Block("heading", question, 3, label=self._anchor(slug(question))))
            blocks.append(Block("list", statements, extra={"class": "findings"}))
        self.blocks[position:position] = blocks

    def references(self) -> dict[str, str]:
        """label -> "Table N" / "Figure N" for every numbered block."""
        return {b.label: f"{b.kind.capitalize()} {b.number}" for b in self.blocks if b.number is not None}

    def texts(self) -> Iterator[str]:
        """Every piece of prose in the document (headings, paragraphs, list items, captions)."""
        for block in self.blocks:
            if block.kind in ("heading", "paragraph", "open"):
                yield block.content
            elif block.kind == "list":
                yield from block.content
            elif block.kind == "table" and block.content[1]:
                yield block.content[1]
            elif block.kind == "figure":
                yield block.content.caption

    def check_references(self) -> None:
        """Every ``[[label]]`` names a numbered block (a dangling one is a bug of the report)."""
        known = self.references()
        missing = sorted({m for text in self.texts() for m in REFERENCE.findall(text or "") if m not in known})
        if missing:
            raise ValueError(f"the report refers to tables or figures it does not contain: {', '.join(missing)}")


def _resolve(text: str, references: dict[str, str], link: bool) -> str:
    def replace(match: re.Match) -> str:
        name = references[match.group(1)]
        return f"<a href='#{match.group(1)}'>{name}</a>" if link else name

    return REFERENCE.sub(replace, text)


def format_cell(value: Any) -> str:
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
    body = ["| " + " | ".join(escape(format_cell(v)) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def render_markdown(document: Document, title: str) -> str:
    document.check_references()
    references = document.references()
    lines = [f"# {title}", ""]
    for block in document.blocks:
        if block.kind in ("heading", "open"):
            lines += ["#" * block.level + " " + _resolve(block.content, references, False), ""]
        elif block.kind == "paragraph":
            lines += [_resolve(block.content, references, False), ""]
        elif block.kind == "list":
            lines += [f"- {_resolve(item, references, False)}" for item in block.content] + [""]
        elif block.kind == "table":
            frame, caption = block.content
            lines += [f"*{references[block.label]}.{' ' + _resolve(caption, references, False) if caption else ''}*", ""]
            lines += [_markdown_table(frame), ""]
        elif block.kind == "figure":
            result: FigureResult = block.content
            lines += [f"![{result.title}](figures/{result.path.name})", "",
                      f"*{references[block.label]}. {_resolve(result.caption, references, False)}*", ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1150px;
       margin: 1.2em auto; padding: 0 .8em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #333; padding-bottom: .2em; margin: .3em 0 .5em; font-size: 1.7em; }
h2 { border-bottom: 1px solid #bbb; padding-bottom: .15em; margin-top: 1.6em; }
details > summary { cursor: pointer; list-style: none; }
details > summary::-webkit-details-marker { display: none; }
details > summary > :is(h2, h3, h4)::before { content: "▾ "; color: #888; }
details:not([open]) > summary > :is(h2, h3, h4)::before { content: "▸ "; }
details > summary > :is(h2, h3, h4) { display: block; }
details:not([open]) > summary > :is(h3, h4) { color: #345; }
table { border-collapse: collapse; margin: .3em 0 1.4em; font-size: 0.88em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .caption { color: #555; font-size: 0.9em; }
.number { font-weight: 600; color: #333; }
code { background: #f4f4f4; padding: 0 3px; }
nav#toc { font-size: 0.85em; line-height: 1.35; }
nav#toc ul { padding-left: 1.1em; margin: .2em 0; }
nav#toc > ul { padding-left: 0; list-style: none; }
nav#toc a { color: #235; text-decoration: none; }
nav#toc a:hover { text-decoration: underline; }
nav#toc .toc-title { font-weight: 600; margin-bottom: .3em; }
@media (min-width: 1300px) {
  body { margin-left: 225px; max-width: 1150px; }
  nav#toc { position: fixed; top: 0; left: 0; width: 205px; height: 100vh; overflow-y: auto; padding: 1em .8em;
            box-sizing: border-box; border-right: 1px solid #ddd; background: #fbfbfb; }
}
@media (max-width: 1299px) { nav#toc { border: 1px solid #ddd; padding: .4em .8em; margin-bottom: 1em; } }
.findings li { margin-bottom: .25em; }
"""


def _inline_html(text: str, references: dict[str, str] | None = None) -> str:
    """Escape, then turn the two Markdown spans we use (**bold**, `code`) and [[label]] references into HTML."""
    escaped = html.escape(text)
    parts = escaped.split("**")
    escaped = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = escaped.split("`")
    escaped = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    return _resolve(escaped, references or {}, True)


def _html_table(frame: pd.DataFrame, styles: pd.DataFrame | None = None, anchor: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)

    def cell(i: int, j: int, value: Any) -> str:
        style = styles.iat[i, j] if styles is not None else ""
        return f"<td style='{html.escape(style, quote=True)}'>" if style else "<td>"

    rows = "".join("<tr>" + "".join(f"{cell(i, j, v)}{html.escape(format_cell(v))}</td>" for j, v in enumerate(row)) + "</tr>"
                   for i, row in enumerate(frame.itertuples(index=False)))
    ident = f" id='{anchor}'" if anchor else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _toc(document: Document) -> str:
    """Nested list of the level-2 and level-3 headings (sections count as headings)."""
    items, depth = [], 2
    for block in document.blocks:
        if block.kind not in ("heading", "open") or block.level > 3:
            continue
        if block.level > depth:
            items.append("<ul>")
        elif block.level < depth:
            items.append("</ul>")
        depth = block.level
        items.append(f"<li><a href='#{block.label}'>{html.escape(REFERENCE.sub('', block.content))}</a></li>")
    if depth == 3:
        items.append("</ul>")
    return "<nav id='toc'><div class='toc-title'>Contents</div><ul>" + "".join(items) + "</ul></nav>"


# A link to a table, figure or heading inside a collapsed section opens the section first.
_SCRIPT = """
function rankscopeOpen() {
  var target = document.getElementById(decodeURIComponent(location.hash.slice(1)));
  for (var node = target; node; node = node.parentElement) { if (node.tagName === 'DETAILS') { node.open = true; } }
  if (target) { target.scrollIntoView(); }
}
window.addEventListener('hashchange', rankscopeOpen);
window.addEventListener('load', function () { if (location.hash) { rankscopeOpen(); } });
"""


def render_html(document: Document, title: str) -> str:
    document.check_references()
    references = document.references()
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>{_toc(document)}<h1 id='top'>{html.escape(title)}</h1>"]
    for block in document.blocks:
        if block.kind == "heading":
            parts.append(f"<h{block.level} id='{block.label}'>{_inline_html(block.content, references)}</h{block.level}>")
        elif block.kind == "open":
            parts.append(f"<details{' open' if block.extra.get('open', True) else ''}><summary>"
                         f"<h{block.level} id='{block.label}'>{_inline_html(block.content, references)}</h{block.level}>"
                         "</summary>")
        elif block.kind == "close":
            parts.append("</details>")
        elif block.kind == "paragraph":
            parts.append(f"<p>{_inline_html(block.content, references)}</p>")
        elif block.kind == "list":
            css = f" class='{block.extra['class']}'" if block.extra.get("class") else ""
            parts.append(f"<ul{css}>" + "".join(f"<li>{_inline_html(i, references)}</li>" for i in block.content) + "</ul>")
        elif block.kind == "table":
            frame, caption = block.content
            number = f"<span class='number'>{references[block.label]}.</span>"
            parts.append(f"<p class='caption'>{number} {_inline_html(caption, references)}</p>")
            parts.append(_html_table(frame, block.extra.get("cell_styles"), block.label))
        elif block.kind == "figure":
            result: FigureResult = block.content
            encoded = base64.b64encode(result.path.read_bytes()).decode("ascii")
            parts.append(f"<figure id='{block.label}'><img alt='{html.escape(result.title, quote=True)}' "
                         f"src='data:image/png;base64,{encoded}'><figcaption><span class='number'>"
                         f"{references[block.label]}.</span> {_inline_html(result.caption, references)}"
                         f"</figcaption></figure>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)
