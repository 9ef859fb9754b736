"""Common Voice releases: names and versions, the TSV files of every generation, clip durations.

A release's locale folder holds ``clips/*.mp3`` and TSVs (``train``, ``dev``, ``test``, ``validated``, ...).
Columns are found by header name, never by position (they changed over the years: ``accent`` became
``accents`` in 17.0; ``variant`` came in 13.0, ``sentence_id``/``sentence_domain`` in 17.0), and quote
characters inside sentences are data, so the TSVs are read with quoting disabled.
"""

from __future__ import annotations

import codecs
import itertools
import logging
import math
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from habla.core import storage, untrusted
from habla.core.errors import HablaError

log = logging.getLogger("habla.commonvoice")

REQUIRED_COLUMNS = ("client_id", "path", "sentence")
# Metadata carried into manifest lines; values are "" when a release lacks the column.
METADATA_COLUMNS = ("client_id", "gender", "age", "accents", "locale")
DURATION_FILES = ("clip_durations.tsv", "times.txt")
#: The longest file name local file systems take (bytes of UTF-8); longer clip names are rejected.
NAME_MAX = 255
#: A TSV line longer than this (characters) is a malformed row; it is not held in memory whole.
MAX_LINE_CHARS = 1_000_000
_CHUNK = 1 << 20

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


# A clip must not escape ``clips/``, and its name ends up in file names, tar members and logs.
is_safe_clip_name = untrusted.is_plain_name


def name_too_long(name: str) -> bool:
    return len(name.encode("utf-8", "surrogateescape")) > NAME_MAX


def open_table(uri: str) -> BinaryIO:
    """A TSV (or duration table) of the release, as a stream; HablaError if it is not a regular file."""
    try:
        return untrusted.open_regular(uri)
    except untrusted.NotAFile as exc:
        raise HablaError(f"{uri}: not a regular file ({exc})") from None


def _decoded_chunks(uri: str) -> Iterator[str]:
    """The text of a TSV in chunks, streamed: UTF-8 (a BOM is dropped), or UTF-16 when it starts with a
    UTF-16 BOM. Bytes that cannot be decoded become U+FFFD (the row is rejected later, not lost)."""
    with open_table(uri) as stream:
        chunk = stream.read(_CHUNK)
        encoding = "utf-8"
        if chunk.startswith(codecs.BOM_UTF8):
            chunk = chunk[len(codecs.BOM_UTF8) :]
        elif chunk.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            encoding = "utf-16"  # the decoder reads the byte order from the BOM
        decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        while chunk:
            text = decoder.decode(chunk)
            if text:
                yield text
            chunk = stream.read(_CHUNK)
        text = decoder.decode(b"", final=True)
        if text:
            yield text


_LINE_END = re.compile(r"\r\n|\r|\n")


def split_lines(chunks: Iterable[str]) -> Iterator[str | None]:
    """Lines without their terminator, from text chunks; None for a line over :data:`MAX_LINE_CHARS`.

    A line ends with ``\n``, ``\r\n`` or ``\r``, in any mix (a file written on one system and appended to on
    another; a CR inside a field ends the line too). Nothing else ends a line: U+2028, U+0085 or a form feed
    inside a sentence is data.
    """
    buffer = ""
    skipping = False  # inside a line that was already reported as too long
    for chunk in chunks:
        buffer += chunk
        # A CR at the very end may be the first half of a CRLF: it stays in the buffer until the next chunk.
        held = buffer.endswith("\r")
        *complete, buffer = _LINE_END.split(buffer[:-1] if held else buffer)
        for line in complete:
            if skipping:
                skipping = False
                continue
            yield None if len(line) > MAX_LINE_CHARS else line
        if len(buffer) > MAX_LINE_CHARS:
            if not skipping:
                yield None
            buffer, skipping = "", True
        if held:
            buffer += "\r"
    if buffer and not skipping:  # the last line, without a terminator or with a lone CR
        line = buffer.removesuffix("\r")
        yield None if len(line) > MAX_LINE_CHARS else line


def read_lines(uri: str) -> Iterator[str | None]:
    """The lines of a table (see :func:`split_lines`), streamed."""
    return split_lines(_decoded_chunks(uri))


def read_tsv(uri: str) -> tuple[list[str], Iterator[TsvRow | MalformedRow]]:
    """Read a Common Voice TSV with quoting disabled. Returns the header and a row iterator.

    A line whose number of tab-separated fields differs from the header's is yielded as a
    :class:`MalformedRow` (never dropped), so callers can account for every line.
    Raises FileNotFoundError if the file is missing, HablaError if the header lacks a required column.
    """
    lines = read_lines(uri)
    header = _header(uri, lines)
    return header, _rows(header, lines)


def read_header(uri: str) -> list[str]:
    """The column names of a Common Voice TSV (reads its first line; the errors of :func:`read_tsv`)."""
    lines = read_lines(uri)
    try:
        return _header(uri, lines)
    finally:
        lines.close()


def _header(uri: str, lines: Iterator[str | None]) -> list[str]:
    try:
        first = next(lines)
    except StopIteration:
        raise HablaError(f"{uri}: empty TSV (no header line)") from None
    if first is None:
        raise HablaError(f"{uri}: not a Common Voice TSV (its first line is over {MAX_LINE_CHARS} characters)")
    header = [h.strip() for h in first.lstrip("\ufeff").split("\t")]
    repeated = sorted({h for h in header if h and header.count(h) > 1})
    if repeated:  # which of the two columns holds the transcripts cannot be told: never guess
        raise HablaError(f"{uri}: not a Common Voice TSV (its header names {', '.join(repeated)} more than once)")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise HablaError(f"{uri}: not a Common Voice TSV (missing column(s) {', '.join(missing)})")
    return header


def _rows(header: list[str], lines: Iterator[str | None]) -> Iterator[TsvRow | MalformedRow]:
    """Every non-empty line is a row (an empty line is not; a line of spaces is, and is malformed)."""
    n = len(header)
    path_index = header.index("path")
    # ``accent`` (before 17.0) and ``accents`` hold the same thing; expose one name.
    accent_alias = "accent" if "accent" in header and "accents" not in header else None
    intern = sys.intern  # speakers and demographic values repeat a lot: share one string each
    for number, line in enumerate(lines, start=2):
        if line is None:
            yield MalformedRow(number, "", f"line longer than {MAX_LINE_CHARS} characters")
            continue
        if not line:
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
    Returns None when the release has neither file: durations then come from decoding. An entry that is
    not a positive finite number is left out (that clip's duration is measured when decoding).
    """
    for filename in DURATION_FILES:
        uri = storage.join(root, filename)
        lines = read_lines(uri)
        try:
            first = next(lines, None)
        except FileNotFoundError:
            continue
        durations: dict[str, float] = {}
        ignored = 0
        for line in itertools.chain([first], lines):
            if not line:
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            if len(parts) < 2:
                continue
            try:
                milliseconds = float(parts[1])
            except ValueError:
                continue  # the header line
            if math.isfinite(milliseconds) and milliseconds > 0:
                durations[parts[0].strip()] = milliseconds / 1000.0
            else:
                ignored += 1
        if ignored:
            log.warning("%s: %d duration(s) not a positive number, measured when decoding instead", uri, ignored)
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


def end_of_archive(tar) -> str | None:
    """After iterating a stream-mode archive: None if it ended with the end-of-archive blocks, else why not.

    tarfile stops silently at the end of the data (an archive cut at a member boundary) or at a header it
    cannot read; a complete archive ends with two zero blocks instead. The rest is read, so that a gzip
    stream is decompressed to its end.
    """
    import tarfile

    stream = tar.fileobj  # tarfile's _Stream: tell() is the position in the uncompressed data
    if stream.tell() != tar.offset + tarfile.BLOCKSIZE:
        return "it ends without the end-of-archive blocks (cut short?)"
    if stream.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
        return "an unreadable header before its end"
    while stream.read(1 << 20):
        pass
    return None


def check_archive_end(archive: str) -> str | None:
    """None if ``archive`` reads to its end-of-archive blocks (the whole stream is read), else what is wrong."""
    import tarfile

    mode = "r|" if archive.endswith(".tar") else "r|gz"
    try:
        with untrusted.open_regular(archive) as stream, tarfile.open(fileobj=stream, mode=mode) as tar:
            for _ in tar:
                tar.members = []
            return end_of_archive(tar)
    except (tarfile.TarError, EOFError, OSError, untrusted.NotAFile) as exc:
        return f"cannot read it ({exc})"
