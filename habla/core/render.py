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
from collections.abc import Mapping, Sequence
from typing import Any

FORMATS = ("table", "markdown", "csv", "json")


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

    ``fmt``: ``table`` (aligned text for a terminal), ``markdown`` (a pipe table, ``|`` and newlines in
    cells escaped), ``csv`` or ``json`` (raw values). ``headers`` renames columns in the header line of the
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
    if fmt == "markdown":
        escape = lambda text: text.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        return tabulate([[escape(c) for c in row] for row in cells], [escape(n) for n in names],
                        tablefmt="pipe", disable_numparse=True)  # fmt: skip
    if fmt == "table":
        return tabulate(cells, names, tablefmt="plain", disable_numparse=True)
    raise ValueError(f"unknown table format {fmt!r} (choose among {', '.join(FORMATS)})")


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def png_html(png: bytes, alt: str) -> str:
    """A self-contained HTML page showing a PNG (the KFP UI renders HTML artifacts; it cannot follow links)."""
    return f'<html><body><img alt="{html.escape(alt)}" src="{png_data_uri(png)}"></body></html>'
