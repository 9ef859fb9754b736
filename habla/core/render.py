"""Tables and pages people read: the one table writer (terminal, Markdown, CSV, JSON) and self-contained HTML.

Markdown and terminal tables are drawn by ``tabulate`` (what pandas' ``to_markdown`` uses too).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

FORMATS = ("table", "markdown", "csv", "json")
# What turns text into Markdown structure: escapes, code spans, table cells, and a link or image target
# (``](`` / ``][``). Emphasis characters are left alone: they cannot hide, fetch or run anything.
_MARKDOWN = re.compile(r"([\\`|])|(?<=\])([(\[])")
# Matplotlib reads text between $ signs as mathematics: data labels are drawn as they are instead.
PLAIN_TEXT = {"text.parse_math": False}


def md(value: Any) -> str:
    """Text drawn from data (TSV fields, clip and file names, paths) made inert for Markdown and HTML viewers:
    shown as it is, one line, never markup, never a tag (``<script>`` comes out as text)."""
    text = html.escape(" ".join(str(value).split()), quote=False)
    return _MARKDOWN.sub(lambda m: "\\" + (m[1] or m[2]), text)


def md_code(value: Any) -> str:
    """``value`` as an inline code span, one line: fenced by more backticks than it holds (HTML inside a code
    span is shown, not run)."""
    text = " ".join(str(value).split())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_block(text: str, language: str = "") -> str:
    """``text`` as a fenced code block that nothing inside it can close."""
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`{3,}", text)), default=0) + 1)
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


def _cell(value: Any, floatfmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return format(value, floatfmt) if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    fmt: str = "markdown",
    *,
    floatfmt: str = ".4f",
    headers: Mapping[str, str] | None = None,
) -> str:
    """``rows`` (dicts) as a table of ``columns`` (default: the keys of the first row, in order).

    ``fmt``: ``table`` (aligned text for a terminal), ``markdown`` (a pipe table, every cell made inert by
    :func:`md`), ``csv`` or ``json`` (raw values). ``headers`` renames columns in the header line of the
    text formats. A missing value is an empty cell (``null`` in JSON).
    """
    from tabulate import tabulate

    columns = list(columns if columns is not None else (rows[0].keys() if rows else []))
    if fmt == "json":
        return json.dumps([{c: r.get(c) for c in columns} for r in rows], indent=2, ensure_ascii=False)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([["" if r.get(c) is None else r.get(c) for c in columns] for r in rows])
        return out.getvalue().rstrip("\n")
    names = [(headers or {}).get(c, c) for c in columns]
    cells = [[_cell(r.get(c), floatfmt) for c in columns] for r in rows]
    if fmt == "markdown":  # every cell inert: data values (group names, sentences, clip names) are not markup
        return tabulate([[md(c) for c in row] for row in cells], [md(n) for n in names],
                        tablefmt="pipe", disable_numparse=True)  # fmt: skip
    if fmt == "table":
        return tabulate(cells, names, tablefmt="plain", disable_numparse=True)
    raise ValueError(f"unknown table format {fmt!r} (choose among {', '.join(FORMATS)})")


def figure_png(fig, dpi: int) -> bytes:
    """A matplotlib figure as PNG bytes (written with storage.write_bytes: atomic, local or ``s3://``)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def inline_png(markdown: str, name: str, png: bytes) -> str:
    """``markdown`` with its link to the image file ``name`` replaced by the image itself: the KFP UI shows a
    Markdown artifact alone and cannot follow a relative link."""
    return markdown.replace(f"]({name})", f"]({png_data_uri(png)})")


# What KFP's Markdown viewer renders of an artifact, the rest cut off (frontend/src/components/viewers/
# MarkdownViewer.tsx, MAX_MARKDOWN_STR_LENGTH, kubeflow/pipelines 2.15-2.17).
KFP_MARKDOWN_MAX = 50 * 1000 * 8


def markdown_for_ui(markdown: str, name: str, png: bytes, *, tail: str = "", where: str = "",
                    limit: int = KFP_MARKDOWN_MAX) -> str:  # fmt: skip
    """``markdown`` with its image ``name`` inlined and ``tail`` appended, as the KFP UI will show it whole: when it
    would be longer than ``limit`` (the UI cuts from the end), the plot and ``tail`` come right after the title and
    the rest is cut at a line, with a note naming the whole report (``where``)."""
    inlined = inline_png(markdown, name, png) + (f"\n\n{tail}" if tail else "")
    if len(inlined) <= limit:
        return inlined
    lines = markdown.splitlines()
    images = [line for line in lines if f"]({name})" in line]
    title, rest = (lines[0], lines[1:]) if lines and lines[0].startswith("#") else ("", lines)
    head = "\n\n".join(x for x in (title, *(inline_png(i, name, png) for i in images), tail) if x)
    note = f"\n\n*… cut to fit the KFP UI ({limit:,} characters); the whole report: {md_code(where or name)}*"
    room = limit - len(head) - len(note) - 2
    body = "\n".join(line for line in rest if line not in images)
    if room <= 0:
        return (head + note)[:limit]
    cut = body[:room]
    cut = cut[: cut.rfind("\n")] if "\n" in cut and len(body) > room else cut
    return f"{head}\n\n{cut}{note}"


def png_html(png: bytes, alt: str) -> str:
    """A self-contained HTML page showing a PNG (the KFP UI renders HTML artifacts; it cannot follow links)."""
    return f'<html><body><img alt="{html.escape(alt)}" src="{png_data_uri(png)}"></body></html>'
