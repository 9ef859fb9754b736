"""Planning over whole columns equals planning row by row, byte for byte (hypothesis): the fast TSV reader (Arrow)
against the row reader on generated hostile files, the duration tables likewise, the column checks against their
one-value originals, and the column planner (habla.data.filters) against the row planner of earlier versions
(plan_reference.py) on generated releases. The whole ``habla prepare`` is compared on them too, in
test_prepare_properties.py."""

from __future__ import annotations

import itertools
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import plan_reference
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_prepare_properties import ANCHORS, SAFE_NAMES, UNSAFE_NAMES, encode_tsv, newlines, profile, tsv_lines

from habla.core.errors import HablaError
from habla.data import columns, commonvoice, filters, tsv
from habla.data.options import PrepareOptions
from habla.speech import text

NAMES = SAFE_NAMES + UNSAFE_NAMES[:3] + ["c0.mp3", "d0.mp3", "t0.mp3"]


@st.composite
def tsv_files(draw, anchor: str = "c0.mp3") -> bytes:
    columns_, lines = draw(tsv_lines(NAMES, anchor))
    junk = draw(st.lists(st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" ")),
                         max_size=1))  # fmt: skip
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"]))
    return encode_tsv(columns_, lines, draw(newlines(len(lines))), encoding, junk)


def rows_as_python(rows: tsv.Rows) -> tuple:
    values = {c: (v.dictionary_decode() if pa.types.is_dictionary(v.type) else v).to_pylist()
              for c, v in rows.columns.items()}  # fmt: skip
    return values, rows.lines.tolist(), [(m.line, m.path, m.detail) for m in rows.malformed], rows.count


def read_both(path: Path):
    """(fast reader's rows or its error, row reader's rows or its error)."""
    out = []
    for fast in (True, False):
        try:
            out.append(rows_as_python(tsv.read_rows(str(path), fast=fast)))
        except HablaError as exc:
            out.append(str(exc))
    return out


@profile(max_examples=300)
@given(data=tsv_files())
def test_the_fast_reader_reads_what_the_row_reader_reads(data):
    with tempfile.TemporaryDirectory() as where:
        path = Path(where) / "train.tsv"
        path.write_bytes(data)
        fast, exact = read_both(path)
        assert fast == exact


def test_the_fast_reader_is_used_where_it_can_be_sure(tmp_path):
    """A well-formed file (any line ends, a BOM, malformed rows) is read by Arrow; an empty line, bytes that are
    not UTF-8, UTF-16 or a line over the limit send the file to the row reader."""
    header = "client_id\tpath\tsentence\tgender\n"
    good = header + "".join(f"s{k}\tc{k}.mp3\thola {k}\tmale\n" for k in range(5000)) + "x\tbad.mp3\n"
    cases = {
        "lf": (good.encode(), True),
        "crlf bom": (b"\xef\xbb\xbf" + good.replace("\n", "\r\n").encode(), True),
        "mixed": (good.replace("\n", "\r", 2000).encode(), True),
        "empty line": (good.replace("\n", "\n\n", 3000).encode(), False),
        "latin-1": (good.replace("hola 4999", "canción").encode("latin-1"), False),
        "utf-16": (good.encode("utf-16"), False),
        "long line": ((header + "s\tc.mp3\t" + "x" * 1_000_100 + "\n").encode(), False),
    }
    for label, (data, fast) in cases.items():
        path = tmp_path / f"{label}.tsv"
        path.write_bytes(data)
        assert tsv.read_rows(str(path)).fast is fast, label
        assert rows_as_python(tsv.read_rows(str(path))) == rows_as_python(tsv.read_rows(str(path), fast=False))


DURATION_VALUES = ["2500", "800", "0", "00012", "nan", "-5", "1e3", "12.5", "inf", "x", "", " 1500", "१२३", "9" * 16]


@profile(max_examples=200)
@given(
    lines=st.lists(
        st.tuples(
            st.sampled_from(NAMES + [" a.mp3", "b.mp3 ", "clip", "ñ.mp3", ""]),
            st.sampled_from(DURATION_VALUES),
            st.sampled_from(["\t", " ", "\t\t", "\textra\t"]),
        ),  # fmt: skip
        max_size=12,
    ),
    ends=st.sampled_from(["\n", "\r\n", "\r"]),
    header=st.booleans(),
)
def test_duration_tables_read_alike(lines, ends, header):
    text_ = ("clip\tduration[ms]" + ends if header else "") + "".join(f"{n}{sep}{v}{ends}" for n, v, sep in lines)
    with tempfile.TemporaryDirectory() as where:
        (Path(where) / "clip_durations.tsv").write_text(text_, encoding="utf-8", newline="")
        assert tsv.as_dict(tsv.read_durations(where)) == commonvoice.read_durations(where)
        assert tsv.as_dict(tsv.read_durations(where, fast=False)) == commonvoice.read_durations(where)


ODD = "0123456789àçöß€😀\u0301İΣ\x00\x1c\u2028´¨ªº.,  "  # characters normalize_text folds, rejects or drops


@profile(max_examples=300)
@given(st.lists(st.text(st.sampled_from(columns._FAST + ODD), max_size=20), max_size=40))
def test_normalizing_a_column_equals_normalizing_each_sentence(sentences):
    texts, rejected = columns.normalize(pa.array(sentences, pa.string()), {})
    rejections = {k: (reason, detail) for k, reason, detail in rejected}
    for k, sentence in enumerate(sentences):
        try:
            expected = text.normalize_text(sentence), None
        except text.TextRejected as exc:
            expected = "", (exc.reason, exc.detail)
        assert (texts[k].as_py(), rejections.get(k)) == expected, sentence


def test_the_fast_characters_normalize_one_by_one():
    """What the fast path relies on: NFC leaves every pair of fast characters alone (no composition), and
    normalizing a fast sentence is lower-casing it, dropping all but letters, and collapsing spaces."""
    fast = columns._FAST
    assert all(unicodedata.normalize("NFC", a + b) == a + b for a, b in itertools.product(fast, repeat=2))
    sample = "".join(fast) + " Hola, ¿QUÉ tal?  —dijo…"
    assert columns.normalize(pa.array([sample]), {})[0][0].as_py() == text.normalize_text(sample)


@profile(max_examples=300)
@given(st.lists(st.text(max_size=12), max_size=30))
def test_json_strings_and_names_equal_their_originals(values):
    import json

    assert columns.json_inner(pa.array(values, pa.string())).to_pylist() == [json.dumps(v, ensure_ascii=False)[1:-1]
                                                                            for v in values]  # fmt: skip
    assert columns.safe_names(pa.array(values, pa.string())).tolist() == [commonvoice.is_safe_clip_name(v)
                                                                         for v in values]  # fmt: skip


OPTIONS = st.builds(
    PrepareOptions,
    splits=st.sampled_from([("train",), ("train", "dev"), ("train", "dev", "test"), ("dev", "test"), ("test",)]),
    train_source=st.sampled_from(["train", "validated"]),
    format=st.sampled_from(["wav", "tar"]),
    shards=st.sampled_from([None, 1, 3]),
    min_duration=st.sampled_from([0.5, 1.5]),
    max_duration=st.sampled_from([3.0, 20.0]),
)


@profile(max_examples=300)
@given(
    tables=st.fixed_dictionaries({name: tsv_files(anchor) for name, anchor in ANCHORS.items()}),
    durations=st.none() | st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(DURATION_VALUES)), max_size=8),
    options=OPTIONS,
)
def test_the_column_planner_equals_the_row_planner(tables, durations, options):
    with tempfile.TemporaryDirectory() as where:
        for name, data in tables.items():
            (Path(where) / f"{name}.tsv").write_bytes(data)
        if durations is not None:
            lines = "".join(f"{n}\t{v}\n" for n, v in durations)
            (Path(where) / "clip_durations.tsv").write_text("clip\tduration[ms]\n" + lines, encoding="utf-8")
        outcomes = []
        for build in (lambda: plan_reference.build_plan(where, options).files(),
                      lambda: plan_reference.columns_files(filters.build_plan(where, options))):  # fmt: skip
            try:
                outcomes.append(build())
            except HablaError as exc:
                outcomes.append(str(exc))
        assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("rows", [0, 1, 70_000])
def test_a_large_file_with_a_malformed_row_in_the_middle(tmp_path, rows):
    """The fast reader's line numbers around rows Arrow turns away (and across its blocks)."""
    lines = [f"s{k % 9}\tc{k}.mp3\tfrase número {k}\tfemale\t\t\tes" for k in range(rows)]
    for k in range(0, len(lines), 9973):
        lines[k] = lines[k] + "\tde más"
    data = ("client_id\tpath\tsentence\tgender\tage\taccents\tlocale\n" + "".join(f"{x}\r\n" for x in lines)).encode()
    (tmp_path / "train.tsv").write_bytes(data)
    fast, exact = read_both(tmp_path / "train.tsv")
    assert fast == exact
    assert tsv.read_rows(str(tmp_path / "train.tsv")).fast
    assert len(np.unique(tsv.read_rows(str(tmp_path / "train.tsv")).lines)) == rows - len(range(0, rows, 9973))
