"""The report as a list of blocks (heading, paragraph, list, table, figure), rendered twice, to
Markdown and to a self-contained HTML page (figures inlined as base64), so both always say the
same thing."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from rankscope.report.figures import FigureResult
from rankscope.report.stats import format_number


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
