"""JSON state files and records (``run.json``, ``models/best.json``, ``plan.json``, claims, a step's summary,
``metrics.json`` ...): the one reader and writer.

A state file is one JSON object in UTF-8, written atomically (habla.core.storage), NaN and infinities refused
(they are not JSON). Reading checks what the caller relies on: a file that is not JSON, not an object, or lacks
a ``required`` field (or holds one of another type) is corrupt. What corrupt means is the caller's choice:
an error in one line (:class:`Corrupt`, a HablaError: exit 2, with the ``remedy`` to apply), or, given a
``fallback``, a warning and "absent" (a watcher's damaged state file must not stop every later poll; a step's
damaged summary means "do the step again").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from habla.core import conditional, jsonl, storage
from habla.core.errors import HablaError

log = logging.getLogger(__name__)

#: ``required`` fields: names (any value but a missing one), or names with the type(s) their value must have.
Required = Mapping[str, type | tuple[type, ...]] | Iterable[str]


class Corrupt(HablaError):
    """A state file that is not what its reader relies on."""


def dumps(value: Any, indent: int | None = 1) -> str:
    """One JSON document and a newline: UTF-8 kept as is, NaN and infinities refused."""
    return jsonl.dump(value, indent) + "\n"


def write(uri: str, value: Any, indent: int | None = 1) -> None:
    """Write ``value`` as a JSON document at ``uri``, atomically."""
    storage.write_text(uri, dumps(value, indent))


def create(uri: str, value: Any) -> bool:
    """Write ``value`` at ``uri`` only if nothing is there (a conditional create); False if something is."""
    return conditional.create_exclusive(uri, dumps(value).encode("utf-8"))


def parse(data: bytes | str, required: Required = ()) -> dict:
    """The JSON object in ``data``; ValueError saying what is wrong (not JSON, not an object, a field)."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    value = jsonl.loads_line(text)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    fields = required.items() if isinstance(required, Mapping) else ((name, object) for name in required)
    for name, kind in fields:
        if name not in value:
            raise ValueError(f"no {name}")
        if not isinstance(value[name], kind) or (isinstance(value[name], bool) and bool not in _types(kind)):
            raise ValueError(f"{name} is {type(value[name]).__name__}, not {_names(kind)}")
    return value


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _types(kind))


def read(uri: str, required: Required = (), *, fallback: str | None = None, remedy: str = "") -> dict | None:
    """The JSON object at ``uri``, or None if there is no file.

    A corrupt one (see the module doc) raises :class:`Corrupt` (``"<uri>: corrupt (<why>); <remedy>"``), or,
    with ``fallback`` (what the caller does instead: ``"treated as absent"``, ``"converting the shard again"``),
    is logged as a warning and read as None. Storage faults (endpoint down, I/O error) propagate either way.
    """
    try:
        return parse(storage.read_bytes(uri), required)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        why = "a folder, not a file"
    except ValueError as exc:  # also UnicodeDecodeError
        why = str(getattr(exc, "reason", None) or exc)
    if fallback is not None:
        log.warning("%s: corrupt state file, %s (%s)", uri, fallback, why)
        return None
    raise Corrupt(f"{uri}: corrupt ({why})" + (f"; {remedy}" if remedy else ""))


def load(uri: str, required: Required = (), *, what: str = "file", remedy: str = "") -> dict:
    """:func:`read` of a file that must be there: a missing one is a HablaError naming ``what`` it is."""
    value = read(uri, required, remedy=remedy)
    if value is None:
        raise HablaError(f"{uri}: no such {what}" + (f"; {remedy}" if remedy else ""))
    return value
