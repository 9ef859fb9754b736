"""Row checks and JSON lines over whole columns (Arrow), each equal, value for value, to its one-row original:
``commonvoice.is_safe_clip_name``, ``commonvoice.name_too_long``, ``speech.text.normalize_text`` and
``json.dumps``. Each does the common case in Arrow and hands the rest to the original, one value at a time:
non-ASCII clip names, sentences with a character outside a set whose normalization is plain lower-casing and
punctuation dropping, strings that JSON escapes. ``tests/data/test_columns.py`` compares them on generated
values."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from habla.data import commonvoice
from habla.speech import text as spanish

Column = pa.Array | pa.ChunkedArray


def flat(values: Column) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def mask(values: Column) -> np.ndarray:
    """A boolean column as numpy (a null counts as false)."""
    return np.asarray(pc.fill_null(values, False).to_numpy(zero_copy_only=False), dtype=bool)


def _python(values: Column, where: np.ndarray) -> list:
    return values.take(pa.array(np.flatnonzero(where), pa.int64())).to_pylist()


# ------------------------------------------------------------------------------------------- clip names

# An ASCII name is safe when it is printable, does not start with a dot and holds no slash or backslash.
_SAFE_ASCII = r"^[\x20-\x2d\x30-\x5b\x5d-\x7e][\x20-\x2e\x30-\x5b\x5d-\x7e]*$"


def safe_names(paths: Column) -> np.ndarray:
    """``commonvoice.is_safe_clip_name`` of each path."""
    safe = mask(pc.match_substring_regex(paths, _SAFE_ASCII))
    other = ~mask(pc.string_is_ascii(paths))
    if other.any():
        safe[other] = [commonvoice.is_safe_clip_name(p) for p in _python(paths, other)]
    return safe


def names_too_long(paths: Column) -> np.ndarray:
    """``commonvoice.name_too_long`` of each path (UTF-8 bytes over the file-name limit)."""
    return pc.binary_length(paths).to_numpy() > commonvoice.NAME_MAX


def plain_audio_names(paths: Column) -> np.ndarray:
    """``habla.data.dataset``'s plain names: lower-case ASCII ``.mp3`` (every Common Voice clip)."""
    ascii_lower = pc.and_(pc.string_is_ascii(paths), pc.invert(pc.match_substring_regex(paths, "[A-Z]")))
    return mask(pc.and_(ascii_lower, pc.ends_with(paths, ".mp3")))


# ------------------------------------------------------------------------------------------------- text

_LETTERS = "".join(c for c in spanish.ALPHABET if c != " ")


def _fast_characters() -> str:
    """Characters whose part in normalize_text is per character and plain: NFC leaves them alone, they are not
    combining, lower-casing maps each to one character (the same in Python and Arrow), and that is either a
    letter of the alphabet or one that folds to a space (punctuation, spaces)."""
    candidates = [chr(c) for c in (*range(0x20, 0x250), *range(0x2000, 0x2070), 0x3000)]
    chosen = []
    for char in candidates:
        lower = char.lower()
        if unicodedata.normalize("NFC", char) != char or unicodedata.combining(char) or len(lower) != 1:
            continue
        if lower in _LETTERS or (lower not in _LETTERS and spanish._fold(lower) == " "):
            chosen.append(char)
    arrow_lower = pc.utf8_lower(pa.array(chosen)).to_pylist()
    return "".join(c for c, low in zip(chosen, arrow_lower) if low == c.lower())


_FAST = _fast_characters()
# Lower-cased, a fast sentence holds letters of the alphabet (ASCII, or C3 xx in UTF-8) and characters that fold
# to a space: ASCII ones, C2 xx (U+0080-U+00BF: ¡ « » ¿ NBSP ...), E2 xx xx (U+2000-U+206F) and E3 80 80 (U+3000).
_ASCII_TO_SPACE = bytes(b if chr(b) in _LETTERS or b >= 0x80 else 0x20 for b in range(256))
# Which UTF-8 sequences are fast characters: single bytes, and the lead and continuation bytes of longer ones.
_ODD_BYTE = bytes(int(b < 0x80 and chr(b) not in _FAST) for b in range(256))
_FAST_CODES = np.array(sorted(int.from_bytes(c.encode(), "big") for c in _FAST if ord(c) >= 0x80), dtype=np.int64)
_ROWS_AT_ONCE = 1 << 16


def normalize(sentences: Column, cache: dict[str, tuple[str, str, str]]) -> tuple[pa.Array, list[tuple]]:
    """``normalize_text`` of each sentence: (texts, "" where rejected; the rejections as (row, reason, detail)).

    ``cache`` holds the outcomes of sentences normalized one by one (the same sentence recurs across TSVs).
    """
    sentences = flat(sentences)
    parts = [_fold(sentences.slice(k, _ROWS_AT_ONCE)) for k in range(0, len(sentences), _ROWS_AT_ONCE)]
    texts = pa.concat_arrays([p[0] for p in parts] or [pa.array([], pa.string())])
    fast = np.concatenate([p[1] for p in parts] or [np.zeros(0, dtype=bool)])
    rejected = [(int(k), "empty_text", "") for k in np.flatnonzero(fast & (pc.utf8_length(texts).to_numpy() == 0))]
    slow = np.flatnonzero(~fast)
    if len(slow):
        outcomes = []
        for sentence in _python(sentences, ~fast):
            if sentence not in cache:
                try:
                    cache[sentence] = (spanish.normalize_text(sentence), "", "")
                except spanish.TextRejected as exc:
                    cache[sentence] = ("", exc.reason, exc.detail)
            outcomes.append(cache[sentence])
        texts = pc.replace_with_mask(texts, pa.array(~fast), pa.array([o[0] for o in outcomes], pa.string()))
        rejected += [(int(k), o[1], o[2]) for k, o in zip(slow, outcomes) if o[1]]
        rejected.sort()
    return texts, rejected


def _rows_of(positions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The row each byte position is in."""
    return np.searchsorted(offsets, positions, side="right") - 1


def _fold(sentences: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(What normalize_text makes of fast sentences, which sentences are fast), on their UTF-8 bytes: lower-cased,
    every character but a letter of the alphabet a space, runs of spaces one, none at either end. (The other
    rows get a valid string of no use.)"""
    n = len(sentences)
    offsets, original = _buffers(sentences)
    fast = np.ones(n, dtype=bool)
    if not len(original):
        return pc.cast(pa.nulls(n), pa.string()).fill_null(""), fast
    # A fast row has no byte of a character outside _FAST: an ASCII one, or a longer one by its lead byte.
    odd = np.flatnonzero(np.frombuffer(original.tobytes().translate(_ODD_BYTE), dtype=np.uint8))
    leads = np.flatnonzero(original >= 0xC0)
    if len(leads):
        size = np.where(original[leads] >= 0xF0, 4, np.where(original[leads] >= 0xE0, 3, 2))
        code = original[leads].astype(np.int64)
        for extra in (1, 2, 3):
            more = size > extra
            code[more] = (code[more] << 8) | original[leads[more] + extra]
        odd = np.concatenate([odd, leads[~np.isin(code, _FAST_CODES)]])
    fast[_rows_of(odd, offsets)] = False
    offsets, data = _buffers(pc.utf8_lower(sentences))
    b = np.frombuffer(data.tobytes().translate(_ASCII_TO_SPACE), dtype=np.uint8).copy()
    two = np.flatnonzero(b == 0xC2)
    b[two], b[two + 1] = 0x20, 0x20
    three = np.flatnonzero((b == 0xE2) | (b == 0xE3))
    b[three], b[three + 1], b[three + 2] = 0x20, 0x20, 0x20
    # Dropped: a space after a space or at a string's start, and a string's trailing spaces.
    starts, ends = offsets[:-1], offsets[1:]
    space = b == 0x20
    dropped = np.empty_like(space)
    dropped[0], dropped[1:] = True, space[:-1]
    dropped[starts[starts < len(b)]] = True
    dropped &= space
    rows, back = np.flatnonzero(ends > starts), 1
    while len(rows):
        rows = rows[space[ends[rows] - back]]
        dropped[ends[rows] - back] = True
        back += 1
        rows = rows[ends[rows] - back >= starts[rows]]
    gone = np.flatnonzero(dropped)
    lengths = ends - starts - np.bincount(_rows_of(gone, offsets), minlength=n)
    out = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=out[1:])
    return pa.StringArray.from_buffers(n, pa.py_buffer(out), pa.py_buffer(np.delete(b, gone).tobytes())), fast


def _buffers(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, UTF-8 bytes) of a string array without nulls."""
    n = len(values)
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)[values.offset : values.offset + n + 1].astype(np.int64)
    data = values.buffers()[2]
    if data is None or offsets[-1] == offsets[0]:
        return offsets - offsets[0], np.empty(0, dtype=np.uint8)
    return offsets - offsets[0], np.frombuffer(data, dtype=np.uint8)[offsets[0] : offsets[-1]]


# ------------------------------------------------------------------------------------------- JSON lines


def json_inner(values: Column) -> pa.Array:
    """Each string as JSON writes it (``json.dumps(value, ensure_ascii=False)``), without the quotes around it:
    the string itself unless it holds a quote, a backslash or a control character."""
    values = flat(values)
    if pa.types.is_dictionary(values.type):  # each value once
        return json_inner(values.dictionary).take(values.indices)
    offsets, data = _buffers(values)
    bad = np.flatnonzero((data < 0x20) | (data == 0x22) | (data == 0x5C))
    if not len(bad):
        return values
    rows = np.unique(np.searchsorted(offsets, bad, side="right") - 1)
    escape = np.zeros(len(values), dtype=bool)
    escape[rows] = True
    encoded = [json.dumps(v, ensure_ascii=False)[1:-1] for v in _python(values, escape)]
    return pc.replace_with_mask(values, pa.array(escape), pa.array(encoded, pa.string()))


def json_numbers(values: np.ndarray) -> pa.Array:
    """Each number as JSON writes a Python float (``repr``), ``null`` for NaN; integers as integers."""
    if values.dtype.kind in "iu":
        return pc.cast(pa.array(values), pa.string())
    unique, index = np.unique(values, return_inverse=True)
    words = ["null" if np.isnan(v) else float.__repr__(float(v)) for v in unique]
    return pa.array(words, pa.string()).take(pa.array(index.reshape(-1), pa.int64()))


def json_lines(fields: list[tuple[str, pa.Array | str, bool]]) -> bytes:
    """JSON-lines bytes of records, keys in the order given, as ``habla.core.jsonl.dumps`` writes them. Each field is
    (key, values, quoted): strings from :func:`json_inner` (quoted), or numbers from :func:`json_numbers`; a str
    is one value for every record."""
    parts: list[pa.Array | str] = []
    for k, (key, value, quoted) in enumerate(fields):
        parts.append(("{" if k == 0 else '"' if fields[k - 1][2] else "") + ("" if k == 0 else ", "))
        parts[-1] += json.dumps(key) + ": " + ('"' if quoted else "")
        parts.append(value)
    parts.append(('"' if fields[-1][2] else "") + "}\n")
    if not any(isinstance(p, pa.Array) for p in parts):
        raise ValueError("no column to write")
    lines = pc.binary_join_element_wise(*parts, "")
    if len(lines) == 0:
        return b""
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[lines.offset : lines.offset + len(lines) + 1]
    return lines.buffers()[2][int(offsets[0]) : int(offsets[-1])].to_pybytes()
