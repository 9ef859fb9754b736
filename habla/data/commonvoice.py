"""Common Voice releases: names and versions, the TSV files of every generation, clip durations.

A release's locale folder holds ``clips/*.mp3`` and TSVs (``train``, ``dev``, ``test``, ``validated``, ...).
Columns are found by header name, never by position (they changed over the years: ``accent`` became
``accents`` in 17.0; ``variant`` came in 13.0, ``sentence_id``/``sentence_domain`` in 17.0), and quote
characters inside sentences are data, so the TSVs are read with quoting disabled.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from habla.core import jsonl, storage
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


def is_safe_clip_name(name: str) -> bool:
    """A plain, printable file name: no folder part, no leading dot (``..``), no control characters or line
    breaks. Data files are untrusted: a clip must not escape ``clips/``, and its name ends up in file
    names, tar members and logs."""
    return bool(name) and name[0] != "." and "/" not in name and "\\" not in name and name.isprintable()


def name_too_long(name: str) -> bool:
    return len(name.encode("utf-8", "surrogateescape")) > NAME_MAX


def _decoded_chunks(uri: str) -> Iterator[str]:
    """The text of a TSV in chunks, streamed: UTF-8 (a BOM is dropped), or UTF-16 when it starts with a
    UTF-16 BOM. Bytes that cannot be decoded become U+FFFD (the row is rejected later, not lost)."""
    try:
        stream = storage.open_regular(uri)
    except storage.NotAFile as exc:
        raise HablaError(f"{uri}: not a regular file ({exc})") from None
    with stream:
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


def split_lines(chunks: Iterable[str]) -> Iterator[str | None]:
    """Lines without their terminator, from text chunks; None for a line over :data:`MAX_LINE_CHARS`.

    Lines end with ``\n`` (``\r\n`` tolerated), or with ``\r`` alone in a file whose first line ends so
    (classic Mac). Nothing else ends a line: U+2028, U+0085 or a form feed inside a sentence is data.
    """
    sep: str | None = None
    buffer = ""
    skipping = False  # inside a line that was already reported as too long
    for chunk in chunks:
        buffer += chunk
        if sep is None:
            i = next((k for k, c in enumerate(buffer) if c in "\r\n"), -1)
            if i < 0 or (buffer[i] == "\r" and i + 1 == len(buffer)):
                if len(buffer) > MAX_LINE_CHARS:
                    yield None
                    buffer, skipping, sep = "", True, "\n"
                continue  # the terminator is not known yet
            sep = "\r" if buffer[i] == "\r" and buffer[i + 1] != "\n" else "\n"
        *complete, buffer = buffer.split(sep)
        for line in complete:
            if skipping:
                skipping = False
                continue
            line = line.removesuffix("\r") if sep == "\n" else line
            yield None if len(line) > MAX_LINE_CHARS else line
        if len(buffer) > MAX_LINE_CHARS:
            if not skipping:
                yield None
            buffer, skipping = "", True
    if buffer and not skipping:
        if sep is None:  # no terminator, or a lone \r at the very end
            sep = "\r" if buffer.endswith("\r") else "\n"
        for line in buffer.split(sep):
            line = line.removesuffix("\r") if sep == "\n" else line
            yield None if len(line) > MAX_LINE_CHARS else line


def _open_lines(uri: str) -> Iterator[str | None]:
    return split_lines(_decoded_chunks(uri))


def read_tsv(uri: str) -> tuple[list[str], Iterator[TsvRow | MalformedRow]]:
    """Read a Common Voice TSV with quoting disabled. Returns the header and a row iterator.

    A line whose number of tab-separated fields differs from the header's is yielded as a
    :class:`MalformedRow` (never dropped), so callers can account for every line.
    Raises FileNotFoundError if the file is missing, HablaError if the header lacks a required column.
    """
    lines = _open_lines(uri)
    try:
        first = next(lines)
    except StopIteration:
        raise HablaError(f"{uri}: empty TSV (no header line)") from None
    if first is None:
        raise HablaError(f"{uri}: not a Common Voice TSV (its first line is over {MAX_LINE_CHARS} characters)")
    header = first.lstrip("\ufeff").split("\t")
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise HablaError(f"{uri}: not a Common Voice TSV (missing column(s) {', '.join(missing)})")
    return header, _rows(header, lines)


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
        lines = _open_lines(uri)
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


@dataclass
class StagedArchive:
    """What :func:`stage_archive` unpacked, and which archive it was (recorded in ``_STAGED.json``)."""

    root: str  # the staged locale folder
    stamp: dict  # the archive's size and mtime / ETag when it was read
    index_sha256: str  # over every member's name, type, size and mtime: which content this was
    skipped: dict[str, list[str]] = field(default_factory=dict)  # clip name -> [reason, detail]: not unpacked

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


STAGED = "_STAGED.json"  # a complete staging, and the archive it came from
STAGING = "_STAGING.json"  # a staging in progress, and the archive it comes from


def _read_json(uri: str) -> dict | None:
    """A small JSON state file, or None if absent or corrupt (a corrupt one is logged and ignored)."""
    try:
        return jsonl.read_object(uri)
    except ValueError as exc:
        log.warning("%s: %s, ignored", uri, exc)
        return None


class _Reader:
    """A forward-only stream that hashes what passes through it (for a checksum sidecar)."""

    def __init__(self, stream, digest) -> None:
        self._stream, self.digest = stream, digest

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if self.digest is not None:
            self.digest.update(data)
        return data


def _end_of_archive(tar) -> str | None:
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


def _sidecar_sha256(archive: str) -> str | None:
    """The SHA-256 in ``<archive>.sha256`` (``sha256sum`` format), if the uploader wrote one."""
    try:
        text = storage.read_capped(archive + ".sha256", 64 * 1024).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except (storage.NotAFile, storage.TooLarge, IsADirectoryError):
        raise HablaError(f"{archive}.sha256: not a checksum file") from None
    digest = (text.split() or [""])[0].lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise HablaError(f"{archive}.sha256: not a SHA-256 checksum")
    return digest


def archive_stamp(archive: str) -> dict:
    try:
        return storage.stamp(archive)
    except FileNotFoundError:
        raise HablaError(f"{archive}: no such archive") from None


def stage_archive(archive: str, staging: str, locale: str, max_clip_bytes: int) -> StagedArchive:
    """Unpack the TSVs, duration tables and clips of one locale from a release archive into ``staging``.

    The archive is read once, as a stream (it can be tens of GB, local or in object storage), each member
    copied in bounded memory. Only ``<top>/<locale>/*.tsv|.txt`` and ``<top>/<locale>/clips/*`` are kept;
    member names are checked so that nothing lands outside ``staging``; clips over ``max_clip_bytes`` are
    not unpacked (listed in ``skipped``). The archive must end with tar's end-of-archive blocks (an archive
    cut short is refused) and match ``<archive>.sha256`` when there is one.

    A staging is tied to the archive's content, not its path: ``staging/<locale>/_STAGED.json`` records the
    archive's size, mtime (ETag on S3) and a hash of its index; a changed archive at the same path is staged
    afresh. An interrupted staging of the same archive resumes, skipping files already written whole.
    """

    stamp = archive_stamp(archive)
    folder = storage.join(staging, locale)  # one folder per locale: runs for two locales never meet
    done = _read_json(storage.join(folder, STAGED))
    fields = ("root", "stamp", "index_sha256", "skipped")
    if done and done.get("stamp") == stamp and all(k in done for k in fields):  # else: staged afresh
        return StagedArchive(**{k: done[k] for k in fields})
    expected_sha256 = _sidecar_sha256(archive)
    progress = {"archive": archive, "stamp": stamp, "sha256": expected_sha256}
    marker = _read_json(storage.join(folder, STAGING)) or {}
    same = {k: marker.get(k) for k in progress} == progress
    if same and marker.get("failed"):  # this very archive was found unusable before: not read again
        raise HablaError(marker["failed"])
    if done or not same:
        for info in storage.list_files(folder):  # another archive's (or an older version's) files
            storage.delete(info.uri)
        storage.write_text(storage.join(folder, STAGING), json.dumps(progress))
    try:
        staged = _unpack(archive, stamp, folder, locale, max_clip_bytes, expected_sha256)
    except HablaError as exc:
        storage.write_text(storage.join(folder, STAGING), json.dumps({**progress, "failed": str(exc)}))
        raise
    storage.write_text(storage.join(folder, STAGED), json.dumps({"archive": archive, **staged.as_json()}))
    storage.delete(storage.join(folder, STAGING))
    return staged


def _unpack(
    archive: str, stamp: dict, folder: str, locale: str, max_clip_bytes: int, expected_sha256: str | None
) -> StagedArchive:
    """The streaming read of :func:`stage_archive`. HablaError for an archive that is not a whole release;
    OSError (a storage fault) as it comes."""
    import tarfile

    already = {info.uri: info.size for info in storage.list_files(folder)}
    index = hashlib.sha256()
    skipped: dict[str, list[str]] = {}
    root = top = None
    try:
        stream = storage.open_regular(archive)
    except (FileNotFoundError, storage.NotAFile) as exc:
        raise HablaError(f"{archive}: no such archive ({exc})") from None
    reader = _Reader(stream, hashlib.sha256() if expected_sha256 else None)
    mode = "r|" if archive.endswith(".tar") else "r|gz"
    try:
        with stream, tarfile.open(fileobj=reader, mode=mode) as tar:
            for member in tar:
                tar.members = []  # stream mode keeps every TarInfo otherwise: millions of clips
                index.update(
                    f"{member.name}\t{member.type!r}\t{member.size}\t{member.mtime}\n".encode("utf-8", "replace")
                )
                parts = member.name.split("/")
                if not member.isfile() or member.name.startswith("/") or ".." in parts or len(parts) < 3:
                    continue
                if parts[1] != locale or not all(is_safe_clip_name(p) for p in parts[2:]):
                    continue
                is_table = len(parts) == 3 and parts[2].endswith((".tsv", ".txt"))
                is_clip = len(parts) == 4 and parts[2] == "clips"
                if not (is_table or is_clip) or name_too_long(parts[-1]):
                    continue
                if top not in (None, parts[0]):
                    raise HablaError(
                        f"{archive}: holds two corpus folders with a '{locale}' locale ({top}, {parts[0]})"
                    )
                top = parts[0]
                root = folder
                if is_clip and member.size > max_clip_bytes:
                    skipped[parts[3]] = ["too_large", f"{member.size} bytes in the archive, more than {max_clip_bytes}"]
                    continue
                target = storage.join(folder, *parts[2:])
                if already.get(target) == member.size:
                    continue
                source = tar.extractfile(member)
                if member.size <= _CHUNK:  # read whole first: a member cut short leaves no trace
                    data = source.read()
                    storage.write_bytes(target, data)
                    continue
                with storage.AtomicWriter(target) as out:
                    shutil.copyfileobj(source, out, _CHUNK)
            problem = _end_of_archive(tar)
    except (tarfile.TarError, EOFError) as exc:
        raise HablaError(f"{archive}: cannot read the archive ({exc})") from None
    if problem:
        raise HablaError(f"{archive}: incomplete archive: {problem}; nothing was prepared from it")
    if expected_sha256 and reader.digest.hexdigest() != expected_sha256:
        raise HablaError(f"{archive}: its SHA-256 differs from {archive}.sha256 (damaged or still arriving)")
    if root is None:
        raise HablaError(f"{archive}: holds no '{locale}' locale folder (<top>/{locale}/*.tsv)")
    return StagedArchive(storage.absolute(root), stamp, index.hexdigest(), skipped)


def check_archive_end(archive: str) -> str | None:
    """None if ``archive`` reads to its end-of-archive blocks (the whole stream is read), else what is wrong."""
    import tarfile

    mode = "r|" if archive.endswith(".tar") else "r|gz"
    try:
        with storage.open_regular(archive) as stream, tarfile.open(fileobj=stream, mode=mode) as tar:
            for _ in tar:
                tar.members = []
            return _end_of_archive(tar)
    except (tarfile.TarError, EOFError, OSError, storage.NotAFile) as exc:
        return f"cannot read it ({exc})"
