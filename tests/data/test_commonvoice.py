import gzip
import os

import pytest
from fixtures.releases import MINI, MINI_V8, tar_bytes

from habla.core.errors import HablaError
from habla.data import commonvoice
from habla.data.commonvoice import MalformedRow, TsvRow, read_durations, read_tsv
from habla.speech.releases import parse_release_name


def rows_of(path):
    _, rows = read_tsv(str(path))
    return list(rows)


def test_columns_by_header_name_in_every_generation(tmp_path):
    v25 = [r for r in rows_of(MINI / "train.tsv") if isinstance(r, TsvRow)]
    v8 = [r for r in rows_of(MINI_V8 / "train.tsv") if isinstance(r, TsvRow)]
    assert {"accents", "variant", "sentence_id", "sentence_domain"} <= set(v25[0].fields)
    # 'accent' (before 17.0) is exposed under the one name 'accents'
    assert "accents" in v8[0].fields and "accent" not in v8[0].fields
    assert v8[0].fields["accents"] == "mexicano"
    # a shuffled column order reads the same
    tsv = tmp_path / "t.tsv"
    tsv.write_text("sentence\tlocale\tpath\tclient_id\nHola\tes\ta.mp3\tspk\n")
    (row,) = rows_of(tsv)
    assert row.fields["path"] == "a.mp3" and row.fields["sentence"] == "Hola" and row.fields["client_id"] == "spk"


def test_quotes_are_data_not_quoting(tmp_path):
    tsv = tmp_path / "t.tsv"
    tsv.write_text(
        "client_id\tpath\tsentence\n"
        'a\t1.mp3\t"Hola, dijo él\n'  # an unbalanced quote must not swallow the next lines
        'b\t2.mp3\tLe llaman "el Rubio"\n'
        'c\t3.mp3\tfin"\n'
    )
    rows = rows_of(tsv)
    assert [r.fields["sentence"] for r in rows] == ['"Hola, dijo él', 'Le llaman "el Rubio"', 'fin"']


def test_malformed_rows_are_reported_with_their_line(tmp_path):
    tsv = tmp_path / "t.tsv"
    tsv.write_text("client_id\tpath\tsentence\na\t1.mp3\tbien\nb\t2.mp3\nc\t3.mp3\tbien\textra\n\nd\t4.mp3\tok\n")
    rows = rows_of(tsv)
    assert [type(r).__name__ for r in rows] == ["TsvRow", "MalformedRow", "MalformedRow", "TsvRow"]
    bad = [r for r in rows if isinstance(r, MalformedRow)]
    assert [(r.line, r.path) for r in bad] == [(3, "2.mp3"), (4, "3.mp3")]


def test_not_a_common_voice_tsv(tmp_path):
    tsv = tmp_path / "t.tsv"
    tsv.write_text("a\tb\n1\t2\n")
    with pytest.raises(HablaError, match="missing column"):
        read_tsv(str(tsv))
    with pytest.raises(FileNotFoundError):
        read_tsv(str(tmp_path / "absent.tsv"))


@pytest.mark.parametrize("column", ["sentence", "path", "gender"])
def test_a_header_naming_a_column_twice_is_refused(tmp_path, column):
    """The last 'sentence' column silently replaced every transcript of the split."""
    header = ["client_id", "path", "sentence", "gender", column]
    tsv = tmp_path / "train.tsv"
    tsv.write_text("\t".join(header) + "\n" + "\t".join(["spk", "1.mp3", "hola", "male", "adios"]) + "\n")
    with pytest.raises(HablaError, match=f"not a Common Voice TSV \\(its header names {column} more than once\\)"):
        read_tsv(str(tsv))


def test_durations_from_either_table(tmp_path):
    assert read_durations(str(MINI_V8)) is None
    durations = read_durations(str(MINI))
    assert len(durations) == 226 and all(0.1 < d < 120 for d in durations.values())
    (tmp_path / "times.txt").write_text("clip\tduration[ms]\nx.mp3\t4250\n")
    assert read_durations(str(tmp_path)) == {"x.mp3": 4.25}


@pytest.mark.parametrize(
    ("name", "version", "delta", "locale"),
    [
        ("cv-corpus-25.0-2026-03-09-es.tar.gz", (25, 0), False, "es"),
        ("s3://inbox/cv-corpus-9.0-2022-04-27-es.tar.gz", (9, 0), False, "es"),
        ("cv-corpus-17.0-delta-2024-03-15-es.tar.gz", (17, 0), True, "es"),
        ("/data/cv-corpus-5.1-2020-06-22-es", (5, 1), False, "es"),
        ("cv-corpus-19.0-2024-09-13-zh-TW.tar.gz", (19, 0), False, "zh-TW"),
    ],
)
def test_release_names(name, version, delta, locale):
    parsed = parse_release_name(name)
    assert (parsed.version, parsed.delta, parsed.locale) == (version, delta, locale)


def test_release_order_is_by_version_not_text():
    names = ["cv-corpus-25.0-2026-03-09-es", "cv-corpus-9.0-2022-04-27-es", "cv-corpus-17.0-2024-03-15-es"]
    ordered = sorted(parse_release_name(n) for n in names)
    assert [r.version_str for r in ordered] == ["9.0", "17.0", "25.0"]
    assert parse_release_name("not-a-release.tar.gz") is None


def test_locate_release(tmp_path):
    assert commonvoice.locate_release(str(MINI.parent), "es") == str(MINI.parent / "es")
    with pytest.raises(HablaError, match="no such file"):
        commonvoice.locate_release(str(tmp_path / "absent"), "es")
    with pytest.raises(HablaError, match="not a Common Voice locale folder"):
        commonvoice.locate_release(str(tmp_path), "es")


# --------------------------------------------------------------------------------- lines, names, tables


def test_cr_only_tsv_rows_are_read_and_counted(tmp_path):
    """Classic-Mac line ends: before, the whole file was one header line and every row vanished uncounted."""
    tsv = tmp_path / "t.tsv"
    tsv.write_bytes(b"client_id\tpath\tsentence\ra\t1.mp3\tuno\rb\t2.mp3\tdos\r")
    assert [(r.line, r.fields["path"]) for r in rows_of(tsv)] == [(2, "1.mp3"), (3, "2.mp3")]
    # CRLF, and a lone CR inside a sentence of a CRLF file: it ends the line (the rest is a malformed row)
    tsv.write_bytes(b"client_id\tpath\tsentence\r\na\t1.mp3\tuno\r\nb\t2.mp3\tdos\rtres\r\n")
    assert [(r.line, type(r).__name__) for r in rows_of(tsv)] == [(2, "TsvRow"), (3, "TsvRow"), (4, "MalformedRow")]


def test_mixed_line_endings_end_every_row(tmp_path):
    """A CRLF header over CR-only rows (a file edited on two systems) read as one header and one malformed row:
    four rows became one rejection. LF, CRLF and CR each end a line, in any mix."""
    tsv = tmp_path / "t.tsv"
    tsv.write_bytes(b"client_id\tpath\tsentence\r\na\t1.mp3\tuno\rb\t2.mp3\tdos\rc\t3.mp3\ttres\rd\t4.mp3\tcuatro\r")
    assert [(r.line, r.fields["path"]) for r in rows_of(tsv)] == [
        (2, "1.mp3"),
        (3, "2.mp3"),
        (4, "3.mp3"),
        (5, "4.mp3"),
    ]
    tsv.write_bytes(b"client_id\tpath\tsentence\na\t1.mp3\tuno\r\n\r\nb\t2.mp3\tdos\r\rc\t3.mp3\ttres\n")
    assert [(r.line, r.fields["path"]) for r in rows_of(tsv)] == [(2, "1.mp3"), (4, "2.mp3"), (6, "3.mp3")]


def test_unicode_line_breaks_and_encodings_keep_rows_whole(tmp_path):
    tsv = tmp_path / "t.tsv"
    text = "client_id\tpath\tsentence\na\t1.mp3\tuno\u2028dos\nb\t2.mp3\ttres\x85\x0c\x1ccuatro\n"
    tsv.write_text(text, encoding="utf-8")
    assert [r.fields["sentence"] for r in rows_of(tsv)] == ["uno\u2028dos", "tres\x85\x0c\x1ccuatro"]
    for encoding in ("utf-8-sig", "utf-16"):  # a BOM says which
        tsv.write_bytes(text.encode(encoding))
        assert [r.fields["path"] for r in rows_of(tsv)] == ["1.mp3", "2.mp3"], encoding
    # a line of spaces is a row (malformed), an empty line is not
    tsv.write_text("client_id\tpath\tsentence\n  \n\na\t1.mp3\tuno\n")
    assert [type(r).__name__ for r in rows_of(tsv)] == ["MalformedRow", "TsvRow"]


def test_an_overlong_line_is_one_malformed_row_not_a_memory_spike(tmp_path, monkeypatch):
    monkeypatch.setattr(commonvoice, "MAX_LINE_CHARS", 50)
    monkeypatch.setattr(commonvoice, "_CHUNK", 16)
    tsv = tmp_path / "t.tsv"
    tsv.write_text("client_id\tpath\tsentence\na\t1.mp3\t" + "x" * 200 + "\nb\t2.mp3\tdos\n")
    rows = rows_of(tsv)
    assert [type(r).__name__ for r in rows] == ["MalformedRow", "TsvRow"]
    assert rows[0].line == 2 and "longer than 50" in rows[0].detail and rows[1].line == 3


def test_a_tsv_that_is_not_a_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "train.tsv")
    with pytest.raises(HablaError, match="not a regular file"):
        read_tsv(str(tmp_path / "train.tsv"))


@pytest.mark.parametrize(
    ("name", "safe"),
    [("common_voice_es_1.mp3", True), ("a b.mp3", True), ("ñandú.mp3", True), ("../x.mp3", False),
     (".hidden.mp3", False), ("a/b.mp3", False), ("a\\b.mp3", False), ("a\x00.mp3", False), ("a\x1b[2J.mp3", False),
     ("a\u2028b.mp3", False), ("a\x85b.mp3", False), ("", False)],
)  # fmt: skip
def test_clip_names_must_be_plain_printable_file_names(name, safe):
    assert commonvoice.is_safe_clip_name(name) is safe


def test_durations_that_are_not_positive_numbers_are_measured_instead(tmp_path):
    (tmp_path / "clip_durations.tsv").write_bytes(
        b"clip\tduration[ms]\ra.mp3\t0\rb.mp3\tnan\rc.mp3\t-5\rd.mp3\tinf\re.mp3\t1500\r"  # CR-only too
    )
    assert read_durations(str(tmp_path)) == {"e.mp3": 1.5}


# ------------------------------------------------------------------------------------------- archives


def _release_members(extra: str = "") -> list[tuple[str, bytes]]:
    tsv = f"client_id\tpath\tsentence\na\t1.mp3\tuno{extra}\n".encode()
    return [("top/es/train.tsv", tsv), ("top/es/clips/1.mp3", b"m" * 700), ("top/es/clips/2.mp3", b"n" * 900)]


def test_an_archive_cut_at_a_member_boundary_is_refused(tmp_path):
    """tarfile stops silently where the data ends; only the end-of-archive blocks say it is whole."""
    whole = tar_bytes(_release_members())
    second_header = whole.index(b"m" * 700) + 1024  # the 700-byte member padded to 1,024
    cases = {
        "at a member boundary": whole[:second_header],
        "inside a header": whole[: second_header + 100],
        "after the last member": whole[: whole.index(b"n" * 900) + 1024],
        "inside the data": whole[: whole.index(b"n" * 900) + 10],
    }
    for label, data in cases.items():
        for suffix, content in ((".tar", data), (".tar.gz", gzip.compress(data))):
            archive = tmp_path / f"cut{suffix}"
            archive.write_bytes(content)
            assert commonvoice.check_archive_end(str(archive)) is not None, (label, suffix)
    archive = tmp_path / "whole.tar"
    archive.write_bytes(whole)
    assert commonvoice.check_archive_end(str(archive)) is None
