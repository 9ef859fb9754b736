import pytest
from conftest import MINI, MINI_V8

from habla.core.errors import HablaError
from habla.data import commonvoice
from habla.data.commonvoice import MalformedRow, TsvRow, parse_release_name, read_durations, read_tsv


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
