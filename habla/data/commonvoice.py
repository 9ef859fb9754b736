"""Common Voice releases: names and versions, the TSV files of every generation, clip durations.

A release's locale folder holds ``clips/*.mp3`` and TSVs (``train``, ``dev``, ``test``, ``validated``, ...).
Columns are found by header name, never by position (they changed over the years: ``accent`` became
``accents`` in 17.0; ``variant`` came in 13.0, ``sentence_id``/``sentence_domain`` in 17.0), and quote
characters inside sentences are data, so the TSVs are read with quoting disabled.
"""

from __future__ import annotations

import dataclasses
import io
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from habla.core import storage
from habla.core.errors import HablaError

REQUIRED_COLUMNS = ("client_id", "path", "sentence")
# Metadata carried into manifest lines; values are "" when a release lacks the column.
METADATA_COLUMNS = ("client_id", "gender", "age", "accents", "locale")
DURATION_FILES = ("clip_durations.tsv", "times.txt")

_RELEASE_RE = re.compile(
    r"cv-corpus-(?P<version>\d+(?:\.\d+)*)(?P<delta>-delta)?-(?P<date>\d{4}-\d{2}-\d{2})(?:-(?P<locale>[A-Za-z]{2,3}(?:-[A-Za-z0-9]+)*))?"
    r"(?P<ext>\.tar\.gz|\.tgz)?$"
)


@dataclass(frozen=True, order=True)
class ReleaseName:
    """A parsed ``cv-corpus-<version>[-delta]-<date>-<locale>[.tar.gz]`` name; orders by version."""

    version: tuple[int, ...]
    date: str
    locale: str
    delta: bool = False
    archive: bool = False

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def name(self) -> str:
        delta = "-delta" if self.delta else ""
        return f"cv-corpus-{self.version_str}{delta}-{self.date}-{self.locale}"


def parse_release_name(text: str) -> ReleaseName | None:
    """Parse a release name from a file or folder name (or the last component of a path/URI)."""
    match = _RELEASE_RE.search(storage.name(text))
    if not match:
        return None
    return ReleaseName(
        version=tuple(int(p) for p in match["version"].split(".")),
        date=match["date"],
        locale=match["locale"] or "",  # an extracted corpus folder has no locale suffix: it is the subfolder
        delta=bool(match["delta"]),
        archive=bool(match["ext"]),
    )


def release_label(uri: str) -> str:
    """A human label for a release location: its cv-corpus name if one appears in the path, else the path."""
    parts = [p for p in str(uri).rstrip("/").replace("\\", "/").split("/") if p]
    for i in range(len(parts) - 1, -1, -1):
        parsed = parse_release_name(parts[i])
        if parsed and not parsed.locale and i + 1 < len(parts):  # cv-corpus-8.0-2022-01-19/es
            parsed = dataclasses.replace(parsed, locale=parts[i + 1])
        if parsed:
            return parsed.name
    return "/".join(parts[-2:]) if parts else str(uri)


# ------------------------------------------------------------------------------------------------- TSVs


@dataclass(slots=True)
class TsvRow:
    """One data row of a TSV, by column name. ``line`` is the 1-based line number in the file."""

    line: int
    fields: dict[str, str]


@dataclass(slots=True)
class MalformedRow:
    """A line whose field count does not match the header."""

    line: int
    path: str  # best effort: the value in the path column, if the line has one
    detail: str


def _open_lines(uri: str) -> Iterator[str]:
    """Lines without their terminator, streamed. Bytes that are not UTF-8 become U+FFFD (rejected later)."""
    if storage.is_s3(uri):
        stream = io.StringIO(storage.read_bytes(uri).decode("utf-8", errors="replace"), newline="\n")
    else:
        stream = open(uri, encoding="utf-8", errors="replace", newline="\n")  # noqa: SIM115
    with stream:
        for line in stream:
            yield line.rstrip("\r\n")


def read_tsv(uri: str) -> tuple[list[str], Iterator[TsvRow | MalformedRow]]:
    """Read a Common Voice TSV with quoting disabled. Returns the header and a row iterator.

    A line whose number of tab-separated fields differs from the header's is yielded as a
    :class:`MalformedRow` (never dropped), so callers can account for every line.
    Raises FileNotFoundError if the file is missing, HablaError if the header lacks a required column.
    """
    lines = _open_lines(uri)
    try:
        header = next(lines).lstrip("\ufeff").split("\t")
    except StopIteration:
        raise HablaError(f"{uri}: empty TSV (no header line)") from None
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise HablaError(f"{uri}: not a Common Voice TSV (missing column(s) {', '.join(missing)})")
    return header, _rows(header, lines)


def _rows(header: list[str], lines: Iterator[str]) -> Iterator[TsvRow | MalformedRow]:
    n = len(header)
    path_index = header.index("path")
    # ``accent`` (before 17.0) and ``accents`` hold the same thing; expose one name.
    accent_alias = "accent" if "accent" in header and "accents" not in header else None
    intern = sys.intern  # speakers and demographic values repeat a lot: share one string each
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        values = line.split("\t")
        if len(values) != n:
            path = values[path_index] if len(values) > path_index else ""
            yield MalformedRow(number, path, f"{len(values)} fields, header has {n}")
            continue
        fields = dict(zip(header, values))
        if accent_alias:
            fields["accents"] = fields.pop(accent_alias)
        for key in ("client_id", "gender", "age", "accents", "locale"):
            if key in fields:
                fields[key] = intern(fields[key])
        yield TsvRow(number, fields)


# -------------------------------------------------------------------------------------------- durations


def read_durations(root: str) -> dict[str, float] | None:
    """Clip durations in seconds from ``clip_durations.tsv`` (16.1+) or ``times.txt`` (14.0), if present.

    Both are two columns: the clip file name and its duration in milliseconds (an optional header line).
    Returns None when the release has neither file: durations then come from decoding.
    """
    for filename in DURATION_FILES:
        uri = storage.join(root, filename)
        try:
            text = storage.read_text(uri)
        except FileNotFoundError:
            continue
        durations: dict[str, float] = {}
        for line in text.splitlines():
            parts = line.split("\t") if "\t" in line else line.split()
            if len(parts) < 2:
                continue
            try:
                durations[parts[0].strip()] = float(parts[1]) / 1000.0
            except ValueError:
                continue  # the header line
        return durations
    return None


# ------------------------------------------------------------------------------------ locating a release


def locate_release(src: str, locale: str) -> str:
    """The locale folder of an extracted release: ``src`` itself or ``src/<locale>``. Raises HablaError."""
    storage.check_readable_root(src)
    for candidate in (src, storage.join(src, locale)):
        if any(storage.exists(storage.join(candidate, f"{s}.tsv")) for s in ("train", "validated", "dev", "test")):
            return candidate
    raise HablaError(
        f"{src}: not a Common Voice locale folder (no train/dev/test/validated.tsv here or under {locale}/)"
    )


def is_archive(src: str) -> bool:
    return str(src).endswith((".tar.gz", ".tgz", ".tar"))


def stage_archive(archive: str, staging: str, locale: str) -> str:
    """Unpack the TSVs, duration tables and clips of one locale from a release archive into ``staging``.

    The archive is read once, as a stream (it can be tens of GB, local or in object storage). Only
    ``<top>/<locale>/*.tsv|.txt`` and ``<top>/<locale>/clips/*`` are kept; member names are checked so that
    nothing lands outside ``staging``. Re-runs are cheap: a completed staging is recorded in
    ``staging/_STAGED.json``, and an interrupted one skips files already written with the right size.
    Returns the staged locale folder.
    """
    import json
    import tarfile

    marker = storage.join(staging, "_STAGED.json")
    if storage.exists(marker):
        return json.loads(storage.read_text(marker))["root"]
    already = {info.uri: info.size for info in storage.list_files(staging)}
    root = None
    try:
        stream = storage.open_stream(archive)
    except FileNotFoundError:
        raise HablaError(f"{archive}: no such archive") from None
    mode = "r|" if archive.endswith(".tar") else "r|gz"
    try:
        with stream, tarfile.open(fileobj=stream, mode=mode) as tar:
            for member in tar:
                parts = member.name.split("/")
                if not member.isfile() or member.name.startswith("/") or ".." in parts:
                    continue
                if len(parts) == 3 and parts[1] == locale and parts[2].endswith((".tsv", ".txt")):
                    pass
                elif len(parts) == 4 and parts[1] == locale and parts[2] == "clips" and parts[3]:
                    pass
                else:
                    continue
                target = storage.join(staging, *parts[1:])
                root = storage.join(staging, locale)
                if already.get(target) == member.size:
                    continue
                storage.write_bytes(target, tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise HablaError(f"{archive}: cannot read the archive ({exc})") from None
    if root is None:
        raise HablaError(f"{archive}: holds no '{locale}' locale folder (<top>/{locale}/*.tsv)")
    storage.write_text(marker, json.dumps({"archive": archive, "root": root}))
    return root
