"""Common Voice TSVs and duration tables read column by column: planning reads 1.7 M rows in seconds, where
reading them row by row takes a minute.

Two readers, one result. The fast one is Arrow's CSV parser (tab-separated, quoting disabled, LF, CRLF and CR
line ends), used where it reads a file exactly as the row reader of habla.data.commonvoice does. Where it
cannot be sure — a UTF-16 file, bytes that are not UTF-8, a line over ``MAX_LINE_CHARS``, an empty line or an
empty clip name (Arrow reads an empty line as a row of empty fields), anything Arrow refuses — the whole file is
read by the row reader instead. ``tests/data/test_tsv.py`` runs both on generated files and compares them.
"""

from __future__ import annotations

import codecs
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from habla.core import storage
from habla.data import commonvoice

log = logging.getLogger("habla.commonvoice")

#: The columns planning reads (``accents`` is ``accent`` before 17.0); "" where a TSV lacks one.
COLUMNS = ("client_id", "path", "sentence", "gender", "age", "accents", "locale")
#: Columns whose values repeat (speakers, demographics): kept dictionary-encoded, one copy of each value.
REPEATED = ("client_id", "gender", "age", "accents", "locale")
_DICTIONARY = pa.dictionary(pa.int32(), pa.string())
# Arrow reads a Python stream a few dozen blocks ahead: small blocks keep that small.
_BLOCK = 1 << 20


class _NotSure(Exception):
    """The fast reader cannot promise the row reader's result for this file."""


@dataclass
class Rows:
    """The data rows of one TSV: the sound ones column by column, with their line numbers, and the malformed."""

    columns: dict[str, pa.Array]  # COLUMNS -> strings (dictionary-encoded: REPEATED), one per sound row
    lines: np.ndarray  # int64: each sound row's line number (the header is line 1)
    malformed: list[commonvoice.MalformedRow]
    fast: bool  # read by Arrow (else by the row reader)

    @property
    def count(self) -> int:
        """Every data row: the accounting base."""
        return len(self.lines) + len(self.malformed)


def read_rows(uri: str, *, fast: bool = True) -> Rows:
    """The rows of a TSV (FileNotFoundError if absent; HablaError for a file that is not a Common Voice TSV)."""
    header = commonvoice.read_header(uri)
    if fast:
        try:
            return _arrow_rows(uri, header)
        except _NotSure as exc:
            log.info("%s: read row by row (%s)", uri, exc)
    return _exact_rows(uri)


def _sources(header: list[str]) -> dict[str, int | None]:
    """The header position each of COLUMNS is read from (None: not in this TSV)."""
    names = {c: "accent" if c == "accents" and "accents" not in header and "accent" in header else c for c in COLUMNS}
    return {c: header.index(names[c]) if names[c] in header else None for c in COLUMNS}


def _exact_rows(uri: str) -> Rows:
    header, rows = commonvoice.read_tsv(uri)
    values: dict[str, list[str]] = {c: [] for c in COLUMNS}
    lines: list[int] = []
    malformed: list[commonvoice.MalformedRow] = []
    for row in rows:
        if isinstance(row, commonvoice.MalformedRow):
            malformed.append(row)
            continue
        lines.append(row.line)
        for column, target in values.items():
            target.append(row.fields.get(column, ""))
    columns = {c: pa.array(v, pa.string()) for c, v in values.items()}
    columns.update({c: columns[c].dictionary_encode() for c in REPEATED})
    return Rows(columns, np.asarray(lines, dtype=np.int64), malformed, fast=False)


class _Checked(io.RawIOBase):
    """A table's bytes as Arrow reads them, checked on the way: not UTF-16, UTF-8 (Arrow parses no line before
    its end arrives, and every line is checked whole by then), no line over ``MAX_LINE_CHARS`` bytes (a line of
    more characters has more bytes). A failed check raises _NotSure out of Arrow's read."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw, self._since, self._started = raw, 0, False  # _since: bytes after the last line end
        self._block = bytearray()
        self._unchecked = b""  # the last line so far, not checked yet (its end has not come)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if len(self._block) != len(buffer):
            self._block = bytearray(len(buffer))
        if hasattr(self._raw, "readinto"):
            size = self._raw.readinto(self._block)
        else:  # an S3 response body
            data = self._raw.read(len(buffer))
            size = len(data)
            self._block[:size] = data
        if not self._started:
            self._started = True
            if self._block[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
                raise _NotSure("UTF-16")
        if self._too_long(self._block, size):
            raise _NotSure(f"a line over {commonvoice.MAX_LINE_CHARS} bytes")
        if not self._utf8(size):
            raise _NotSure("bytes that are not UTF-8")
        buffer[:size] = memoryview(self._block)[:size]
        return size

    def _utf8(self, size: int) -> bool:
        """Whether the lines that end in this block (with the part of the first one read before) are UTF-8."""
        data = bytes(self._block[:size])
        if not size:  # the end: the last line
            checked, self._unchecked = self._unchecked, b""
        else:
            end = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
            checked = self._unchecked + data[:end] if end else b""
            self._unchecked = data[end:] if end else self._unchecked + data
        if not checked:
            return True
        offsets = pa.py_buffer(np.array([0, len(checked)], dtype=np.int32))
        try:
            pa.StringArray.from_buffers(1, offsets, pa.py_buffer(checked)).validate(full=True)
        except pa.ArrowInvalid:
            return False
        return True

    def _too_long(self, data: bytearray, size: int) -> bool:
        limit = commonvoice.MAX_LINE_CHARS
        lf = data.find(b"\n", 0, size)
        first = data.find(b"\r", 0, lf if lf >= 0 else size)
        first = lf if first < 0 else first
        if first < 0:
            self._since += size
            return self._since > limit
        lf = data.rfind(b"\n", 0, size)
        last = max(lf, data.rfind(b"\r", max(lf, 0), size))
        if self._since + first > limit:
            return True
        self._since = size - last - 1
        # A line over the limit between two line ends holds an aligned window of half the limit without one.
        window = max(1, limit // 2)
        for start in range(first, last, window):
            end = min(start + window, last)
            if data.find(b"\n", start, end) < 0 and data.find(b"\r", start, end) < 0:
                found = np.frombuffer(data, dtype=np.uint8, count=last + 1)[first:]
                positions = np.flatnonzero((found == 10) | (found == 13))
                return bool(len(positions) > 1 and np.diff(positions).max() - 1 > limit)
        return False


def _arrow_table(
    uri: str, width: int, wanted: dict[str, int], skip: int, repeated: tuple[str, ...] = ()
) -> tuple[dict[str, pa.Array], list[tuple[int, str]]]:
    """Arrow's parse of a table of ``width`` tab-separated fields: the ``wanted`` fields (name -> position) of
    the rows with ``width`` fields, and (line number, text) of the others. _NotSure when it cannot be exact."""
    names = [f"f{i}" for i in range(width)]
    invalid: list[tuple[int, str]] = []

    def other(row) -> str:
        invalid.append((row.number, row.text))
        return "skip"

    include = sorted(set(wanted.values()))
    types = {names[i]: pa.string() for i in include}
    types.update({names[wanted[c]]: _DICTIONARY for c in repeated if c in wanted})
    with commonvoice.open_table(uri) as raw:
        stream = _Checked(raw)
        try:
            reader = pcsv.open_csv(
                stream,
                read_options=pcsv.ReadOptions(block_size=_BLOCK, use_threads=False, skip_rows=skip, column_names=names),
                parse_options=pcsv.ParseOptions(
                    delimiter="\t",
                    quote_char=False,
                    escape_char=False,
                    newlines_in_values=False,
                    ignore_empty_lines=False,
                    invalid_row_handler=other,
                ),  # fmt: skip
                convert_options=pcsv.ConvertOptions(
                    column_types=types,
                    include_columns=[names[i] for i in include],
                    check_utf8=False,  # checked as it streams by (_Checked): an undecodable row reaches no handler
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                ),  # fmt: skip
            )
            batches = list(reader)
        except pa.ArrowInvalid as exc:
            raise _NotSure(str(exc).splitlines()[0]) from None
    if any(number is None for number, _ in invalid):
        raise _NotSure("a row without its line number")
    chunks = {name: [b.column(names[i]) for b in batches] for name, i in wanted.items()}
    del batches
    columns = {}
    for name in list(chunks):  # one column at a time: the batches' memory is freed as their columns are joined
        parts = chunks.pop(name)
        columns[name] = pa.concat_arrays(parts) if parts else pa.array([], types[names[wanted[name]]])
    return columns, invalid


def _arrow_rows(uri: str, header: list[str]) -> Rows:
    sources = _sources(header)
    wanted = {c: i for c, i in sources.items() if i is not None}
    columns, invalid = _arrow_table(uri, len(header), wanted, skip=1, repeated=REPEATED)
    count = len(columns["path"])
    if count and pc.any(pc.equal(columns["path"], "")).as_py():
        raise _NotSure("an empty line or an empty clip name")
    for c, i in sources.items():
        if i is None:
            columns[c] = pa.DictionaryArray.from_arrays(pa.array(np.zeros(count, np.int32)), pa.array([""]))
    lines = _sound_lines(count, [n for n, _ in invalid], first=2)
    path_index, width = header.index("path"), len(header)
    malformed = []
    for number, text in invalid:
        if len(text) > commonvoice.MAX_LINE_CHARS:
            raise _NotSure("a line too long")
        values = text.split("\t")
        path = values[path_index] if len(values) > path_index else ""
        malformed.append(commonvoice.MalformedRow(number, path, f"{len(values)} fields, header has {width}"))
    return Rows({c: columns[c] for c in COLUMNS}, lines, malformed, fast=True)


def _sound_lines(count: int, invalid: list[int], first: int) -> np.ndarray:
    """Line numbers of the rows Arrow parsed: with no empty line, every line from ``first`` on is a row, the
    ``invalid`` ones at the numbers Arrow gave."""
    total = count + len(invalid)
    numbers = np.arange(first, first + total, dtype=np.int64)
    if not invalid:
        return numbers
    bad = np.asarray(invalid, dtype=np.int64)
    if len(np.unique(bad)) != len(bad) or bad.min() < first or bad.max() >= first + total:
        raise _NotSure("rows out of line")
    return numbers[~np.isin(numbers, bad)]


# -------------------------------------------------------------------------------------------- durations


@dataclass
class Durations:
    """A release's duration table (``clip_durations.tsv``, or ``times.txt`` in 14.0-style releases)."""

    file: str  # which one was read
    names: pa.Array  # clip names, last entry first (a name's first entry here is the one that counts)
    seconds: np.ndarray  # float64, positive and finite

    def lookup(self, paths: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Each path's duration in seconds, NaN where the table has none."""
        found = pc.index_in(paths, value_set=self.names)
        out = np.full(len(paths), np.nan)
        if len(self.names):
            index = columns_numpy(pc.fill_null(found, -1))
            known = index >= 0
            out[known] = self.seconds[index[known]]
        return out


def columns_numpy(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values.to_numpy(zero_copy_only=False)


def read_durations(root: str, *, fast: bool = True) -> Durations | None:
    """The first duration table the release has, as :func:`habla.data.commonvoice.read_durations` reads it:
    two columns (a clip name, milliseconds), an optional header, entries that are not a positive finite
    number left out (that clip is measured when decoding), a later entry for a name replacing an earlier one.
    None when the release has neither table."""
    for filename in commonvoice.DURATION_FILES:
        uri = storage.join(root, filename)
        try:
            if fast:
                try:
                    entries = _arrow_durations(uri)
                except _NotSure as exc:
                    log.info("%s: read line by line (%s)", uri, exc)
                    entries = _exact_durations(uri)
            else:
                entries = _exact_durations(uri)
        except FileNotFoundError:
            continue
        numbers, names, milliseconds = entries
        valid = np.isfinite(milliseconds) & (milliseconds > 0)
        if (~valid).sum():
            log.warning("%s: %d duration(s) not a positive number, measured when decoding instead", uri,
                        int((~valid).sum()))  # fmt: skip
        numbers, names, milliseconds = numbers[valid], names.filter(pa.array(valid)), milliseconds[valid]
        order = np.arange(len(numbers))[::-1]  # the last entry for a name wins: it comes first
        if len(numbers) > 1 and (np.diff(numbers) < 0).any():
            order = np.argsort(numbers, kind="stable")[::-1]
        return Durations(filename, names.take(pa.array(order, pa.int64())), milliseconds[order] / 1000.0)
    return None


_Entries = tuple[np.ndarray, pa.Array, np.ndarray]  # (line numbers, names, milliseconds) of the entries


def _entry(line: str) -> tuple[str, float] | None:
    """One line of a duration table as the row reader takes it: (name, milliseconds), or None (not an entry)."""
    parts = line.split("\t") if "\t" in line else line.split()
    if len(parts) < 2:
        return None
    try:
        return parts[0].strip(), float(parts[1])
    except ValueError:
        return None  # the header line


def _entries(found: list[tuple[int, str]], parse: Callable[[str], tuple[str, float] | None] = _entry) -> _Entries:
    parsed = [(number, entry) for number, line in found if line and (entry := parse(line)) is not None]
    return (
        np.asarray([n for n, _ in parsed], dtype=np.int64),
        pa.array([e[0] for _, e in parsed], pa.string()),
        np.asarray([e[1] for _, e in parsed], dtype=np.float64),
    )


def _exact_durations(uri: str) -> _Entries:
    lines = commonvoice.read_lines(uri)
    return _entries([(n, line) for n, line in enumerate(lines, start=1) if line is not None])


def _arrow_durations(uri: str) -> _Entries:
    columns, invalid = _arrow_table(uri, 2, {"name": 0, "ms": 1}, skip=0)
    names, ms = columns["name"], columns["ms"]
    numbers = _sound_lines(len(names), [n for n, _ in invalid], first=1)
    # The usual line: a printable ASCII name without spaces around it and a whole number of milliseconds.
    # (an ASCII string strips nothing when its first and last characters are above the space)
    digits = pc.and_(pc.and_(pc.string_is_ascii(ms), pc.utf8_is_digit(ms)), pc.less_equal(pc.binary_length(ms), 15))
    ends = pc.and_(pc.greater(pc.utf8_slice_codeunits(names, 0, 1), " "),
                   pc.greater(pc.utf8_slice_codeunits(names, -1), " "))  # fmt: skip
    plain = pc.and_(digits, pc.and_(pc.string_is_ascii(names), ends))
    plain_np = plain.to_numpy(zero_copy_only=False)
    odd = np.flatnonzero(~plain_np)
    others = [(int(numbers[k]), f"{names[k].as_py()}\t{ms[k].as_py()}") for k in odd]
    for number, text in invalid:
        if len(text) > commonvoice.MAX_LINE_CHARS:
            raise _NotSure("a line too long")
        others.append((number, text))
    extra = _entries(others)
    kept = pa.array(plain_np)
    values = pc.cast(ms.filter(kept), pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64)
    return (
        np.concatenate([numbers[plain_np], extra[0]]),
        pa.concat_arrays([names.filter(kept), extra[1]]),
        np.concatenate([values, extra[2]]),
    )


def as_dict(durations: Durations | None) -> dict[str, float] | None:
    """The table as the row reader's dict (for tests and small releases)."""
    if durations is None:
        return None
    return dict(zip(reversed(durations.names.to_pylist()), (float(s) for s in reversed(durations.seconds))))
