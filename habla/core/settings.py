"""``KEY=VALUE`` arguments: the one parser behind ``--env``, ``--label``, ``--param``, pipeline settings and
config overrides."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from habla.core.errors import HablaError


def split_pair(item: str, what: str = "argument") -> tuple[str, str]:
    """``"a.b=1"`` -> ``("a.b", "1")``; HablaError unless there is a non-empty key and an ``=``."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise HablaError(f"{what} must look like KEY=VALUE, got {item!r}")
    return key, value


def parse_pairs(items: Iterable[str], what: str = "argument", *, typed: bool = False) -> dict[str, Any]:
    """``KEY=VALUE`` items as a dict (a repeated key keeps its last value).

    ``typed``: a value that parses as JSON (``2``, ``0.5``, ``true``, ``"x"``) keeps that type; anything
    else stays a string.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, value = split_pair(item, what)
        if typed:
            try:
                out[key] = json.loads(value)
                continue
            except ValueError:
                pass
        out[key] = value
    return out
