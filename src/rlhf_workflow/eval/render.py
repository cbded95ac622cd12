"""Tables and images as Markdown and HTML, for the run report and the paired comparison."""

from __future__ import annotations

import base64
import html
from pathlib import Path


def markdown_table(header: list[str], cells: list[list[str]]) -> list[str]:
    """The lines of a Markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + \
        ["| " + " | ".join(line) + " |" for line in cells]


def html_table(header: list[str], cells: list[list[str]]) -> str:
    """An HTML table, every cell escaped."""
    return ("<table border='1' cellpadding='4' style='border-collapse:collapse'><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in cells)
            + "</table>")


def html_page(title: str, body: list[str]) -> str:
    """A whole HTML page around ``body``."""
    return ("<!doctype html>\n<html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
            "<style>img{max-width:100%;height:auto}</style>"  # a wide plot shrinks to the window, never cut off
            "</head><body style='font-family:sans-serif'>\n" + "\n".join(body) + "\n</body></html>\n")


def html_image(path: Path, alt: str) -> str:
    """An <img> that carries the PNG ``path`` itself (a data: URI), so that the page is one file that
    shows its plots wherever it is moved, mailed or attached."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"<img src='data:image/png;base64,{data}' alt='{html.escape(alt)}'>"
