"""JSON lines (manifests, rejection lists, per-shard results): one JSON value per ``\\n``-terminated line.

Lines are split on ``\\n`` only. ``str.splitlines`` also splits on U+2028, U+0085, form feeds and other
characters that JSON leaves unescaped inside strings (``ensure_ascii=False``), which would cut a valid
line in two. NaN and infinities are not JSON: they are refused when writing and when reading.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from typing import Any

_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_decode = json.JSONDecoder(parse_constant=_refuse_constant).decode


def lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of the non-blank lines of ``text``, split on ``\\n`` only (``\\r\\n`` tolerated)."""
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line


def loads_line(line: str) -> Any:
    """One JSON value; ``ValueError`` if it is not JSON or holds NaN/Infinity."""
    return _decode(line)


def loads(text: str) -> list[Any]:
    """Every value of a JSON-lines text (raises ``ValueError`` on a line that is not JSON)."""
    return [_decode(line) for _, line in lines(text)]


def dumps(records: Iterable[Any]) -> str:
    """JSON lines, UTF-8 kept as is; NaN and infinities are refused (they are not JSON)."""
    return "".join(_encode(r) + "\n" for r in records)


def dump(value: Any, indent: int | None = 1) -> str:
    """One JSON document (``report.json``, ``metrics.json`` ...): UTF-8 kept as is, NaN and infinities refused."""
    return json.dumps(value, indent=indent, ensure_ascii=False, allow_nan=False)


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None: for summaries, where a diverged loss or a
    validation that never ran means "no number", and JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value
