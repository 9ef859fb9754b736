"""Property-based tests of ``habla prepare`` under hostile input (hypothesis).

Each example is a small generated release: TSV bytes in random encodings (UTF-8 with or without BOM, UTF-16,
Latin-1), line endings (LF, CRLF, CR, or a mix of them in one file), header orders and repeated header names,
quotes, control characters and Unicode line breaks in every field, blank and over-long lines, raw undecodable
bytes; clip files that are real MP3s of several rates and channel counts, other formats under ``.mp3``, silence,
a few samples, empty, truncated, random bytes, symlinks (to a clip, to ``/dev/zero``, dangling, a loop), FIFOs
and folders; a duration table with odd
entries; sometimes packed into an archive, sometimes cut short; and random options. For every example:

* no traceback, and exit 0 or 2 (2 only with one line naming a known kind of bad input);
* manifest lines + rejected lines == rows read, per split, as counted here from the generated lines;
* every manifest line is JSON, its audio a readable 16 kHz mono file; audio files are distinct;
* every rejection reason is one docs/layout.md lists;
* nothing is written outside DST (the release, the temporary folder and the folder around are unchanged);
* a second run changes no byte, inode or mtime in DST (folders included).

The kill-and-resume property: a run killed with SIGKILL at a random moment (twice), then run again, ends
byte-identical to an uninterrupted run, with no temporary file left.

CI runs the ``ci`` profile (fixed examples, derandomized, with a deadline). The long profile:
``HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -m hostile_long tests/data/test_prepare_properties.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import tarfile
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import plan_reference
import pytest
import soundfile as sf
from fixtures.commands import HABLA, cli_env
from fixtures.releases import MINI, ROOT, SMALL_HEADER
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st

from habla import cli
from habla.core import jsonl
from habla.data.options import PrepareOptions
from habla.speech.text import ALPHABET

PROFILES = {
    "ci": {"max_examples": 60, "deadline": timedelta(seconds=60), "derandomize": True},
    "long": {"max_examples": 400, "deadline": None},
}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
KILL_EXAMPLES = {"ci": 6, "long": 60}[PROFILE]


def profile(**overrides) -> settings:
    return settings(
        **{**PROFILES[PROFILE], **overrides},
        database=None,  # nothing written into the repository
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],  # no slow "explain"
        print_blob=True,
    )


# Every reason code docs/layout.md lists (the harness fails on an undocumented one).
_REASONS_DOC = (ROOT / "docs" / "layout.md").read_text().split("Reason codes")[1].split("Invariant:")[0]
DOCUMENTED_REASONS = {
    code for row in re.findall(r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)? \|", _REASONS_DOC, re.M) for code in row if code
}
# The kinds of bad input that may end a run with exit 2.
BAD_INPUT = re.compile(
    r"no such TSV|not a Common Voice TSV|empty TSV|no clips/ folder|passed the filters|more than once|"
    r"incomplete archive|cannot read the archive|holds no 'es' locale|two corpus folders|no such archive|"
    r"not a regular file"
)


# ------------------------------------------------------------------------------------------- clip files


def _mini_clips_by_format() -> list[Path]:
    """One real clip of 1-4 s per (sample rate, channels) of the bundled release: 48/44.1/32 kHz, mono/stereo."""
    durations = dict(line.split("\t") for line in (MINI / "clip_durations.tsv").read_text().splitlines()[1:])
    chosen = {}
    for name in sorted(durations):
        if 1000 <= int(durations[name]) <= 4000:
            info = sf.info(MINI / "clips" / name)
            chosen.setdefault((info.samplerate, info.channels), MINI / "clips" / name)
    return list(chosen.values())


REAL = _mini_clips_by_format()


def _encoded(fmt: str, subtype: str | None, rate: int, stereo: bool = False, level: float = 1.0) -> bytes:
    speech, source = sf.read(REAL[0], dtype="float32")
    samples = speech[:: max(1, source // rate)] * level
    if stereo:
        samples = np.stack([samples, samples * 0.5], axis=1)
    out = io.BytesIO()
    sf.write(out, samples, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def _tiny(samples, rate: int = 48000, subtype: str = "PCM_16") -> bytes:
    out = io.BytesIO()
    sf.write(out, np.asarray(samples, dtype=np.float32), rate, format="WAV", subtype=subtype)
    return out.getvalue()


_NAN = np.full(8000, 0.1, dtype=np.float32)
_NAN[7] = np.nan
OTHER_FORMATS = {
    "wav": _encoded("WAV", "PCM_16", 22050),
    "flac": _encoded("FLAC", "PCM_16", 16000, stereo=True),
    "ogg": _encoded("OGG", "VORBIS", 24000),
    "silence": _tiny(np.zeros(96000)),
    "three_samples": _tiny([0.3, -0.2, 0.1]),
    "nan": _tiny(_NAN, 16000, "FLOAT"),
    "rate_4k": _tiny(np.random.default_rng(0).normal(0, 0.1, 8000), 4000),
}
KINDS = ("real", *OTHER_FORMATS, "empty", "truncated", "random", "link_clip", "link_zero", "dangling", "loop",
         "fifo", "folder", "missing")  # fmt: skip
SAFE_NAMES = ["c1.mp3", "c2.mp3", "c3.mp3", "c4.mp3", "c5.mp3", "x.mp3", "x.wav", "X.mp3", "a b.mp3",
              "ñandú.mp3", "a" * 246 + ".mp3"]  # fmt: skip
UNSAFE_NAMES = ["../escape.mp3", "/etc/hostname", ".hidden.mp3", "c" * 300 + ".mp3", "tab\x0bname.mp3",
                "line\u2028sep.mp3", ""]  # fmt: skip


ANCHORS = {"train": "c0.mp3", "validated": "c0.mp3", "dev": "d0.mp3", "test": "t0.mp3"}


@st.composite
def clip_files(draw) -> dict[str, tuple]:
    """What each clip name is on disk: (kind, parameter). Each TSV's first row names a real clip (its anchor),
    so that most examples convert something; the other names are hostile half of the time."""
    files = {name: ("real", draw(st.sampled_from(range(len(REAL))))) for name in sorted(set(ANCHORS.values()))}
    for name in draw(st.lists(st.sampled_from(SAFE_NAMES), min_size=1, max_size=6, unique=True)):
        kind = draw(one_in(2, st.sampled_from(KINDS), st.just("real")))
        if kind == "real":
            files[name] = (kind, draw(st.sampled_from(range(len(REAL)))))
        elif kind == "truncated":
            files[name] = (kind, draw(st.floats(0.01, 0.9)))
        elif kind == "random":
            files[name] = (kind, draw(st.binary(max_size=3000)))
        else:
            files[name] = (kind, None)
    return files


def materialize_clips(clips: Path, files: dict[str, tuple]) -> None:
    clips.mkdir(parents=True, exist_ok=True)
    real_names = [n for n, (k, _) in files.items() if k == "real"]
    for name, (kind, param) in files.items():
        path = clips / name
        if kind == "real":
            path.write_bytes(REAL[param].read_bytes())
        elif kind in OTHER_FORMATS:
            path.write_bytes(OTHER_FORMATS[kind])
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "truncated":
            data = REAL[0].read_bytes()
            path.write_bytes(data[: int(len(data) * param)])
        elif kind == "random":
            path.write_bytes(param)
        elif kind == "link_clip":
            os.symlink(clips / real_names[0] if real_names else REAL[1], path)
        elif kind == "link_zero":
            os.symlink("/dev/zero", path)
        elif kind == "dangling":
            os.symlink(clips / "nowhere.mp3", path)
        elif kind == "loop":
            os.symlink(path, path)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "folder":
            path.mkdir()


# ------------------------------------------------------------------------------------------------ TSVs

GOOD_SENTENCES = ["hola que tal", "buenos días", "¿Dónde está el perro?", "El niño come pan.", "muy bien gracias"]
ODD_CHARS = list("abcñáéü ¿?¡!«»\"'“”—…0123456789\x00\x01\x07\x0b\x0c\x1b\x1c\x7f\x85\u2028\u2029\ufeff\ufffd\r\t😀中ß")
field_text = st.text(
    st.sampled_from(ODD_CHARS) | st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), max_size=24
)
METADATA = {"gender": ["male_masculine", "female_feminine", ""], "age": ["twenties", "thirties", ""],
            "accents": ["México", "Caribe", ""], "locale": ["es"]}  # fmt: skip


def one_in(n: int, rare, usual):
    """``rare`` about once in ``n`` draws, else ``usual`` (hypothesis picks one_of's branches evenly). The
    middle value picks it: hypothesis tries the bounds first and often."""
    return st.integers(0, n - 1).flatmap(lambda k: rare if k == n // 2 else usual)


@st.composite
def tsv_lines(draw, names: list[str], anchor: str) -> tuple[list[str], list[str]]:
    """(header columns, data lines); every non-empty data line is one row. Most rows are sound, so that most
    examples convert clips; the rest are hostile in one field or in their shape."""
    columns = list(SMALL_HEADER)
    if draw(st.booleans()):
        columns = draw(st.permutations(columns))
    if draw(st.integers(0, 29)) == 15:
        columns.remove(draw(st.sampled_from(["client_id", "path", "sentence"])))  # not a Common Voice TSV
    elif draw(st.integers(0, 29)) == 15:  # a column named twice: which one holds the sentences cannot be told
        columns.insert(draw(st.integers(0, len(columns))), draw(st.sampled_from(["sentence", "path", "gender"])))
    lines = []
    for k in range(draw(st.integers(1, 7))):
        shape = 11 if k == 0 else draw(st.integers(0, 11))  # the first row is a sound one
        if shape == 0:
            lines.append("")  # a blank line: not a row
            continue
        if shape == 1:
            lines.append(draw(st.sampled_from([" ", "\x0c", "\u2028", "\t\t", "\ufeff"])))  # a row, malformed
            continue
        row = {
            "client_id": draw(one_in(4, field_text, st.sampled_from(["spk1", "spk2", "spk3"]))),
            "path": anchor
            if k == 0
            else draw(
                st.sampled_from(UNSAFE_NAMES) | field_text if shape == 3 else st.sampled_from(names)
            ),  # fmt: skip
            "sentence": draw(field_text if shape == 4 else st.sampled_from(GOOD_SENTENCES)),
        }
        for column, values in METADATA.items():
            row[column] = draw(one_in(5, field_text, st.sampled_from(values)))
        values = [row.get(c, "") for c in columns]
        if shape == 2:  # a field too many or too few
            values = values + ["extra"] if draw(st.booleans()) else values[:-1]
        lines.append("\t".join(values))
    return columns, lines


def tsv_text(columns: list[str], lines: list[str], newline: str | list[str]) -> str:
    """The header and the lines, each ended by ``newline`` (or by its own terminator, in a file of mixed ones)."""
    ends = newline if isinstance(newline, list) else [newline] * (len(lines) + 1)
    return "".join(line + end for line, end in zip(["\t".join(columns), *lines], ends))


def encode_tsv(
    columns: list[str], lines: list[str], newline: str | list[str], encoding: str, junk: list[bytes]
) -> bytes:
    """The file's bytes: the text, then lines of undecodable bytes (one row each)."""
    data = tsv_text(columns, lines, newline).encode(encoding, errors="replace")
    if encoding != "utf-16":
        last = newline[-1] if isinstance(newline, list) else newline
        data += b"".join(j + last.encode() for j in junk)
    return data


def expected_rows(columns: list[str], lines: list[str], newline: str | list[str], junk: list[bytes],
                  encoding: str) -> int:  # fmt: skip
    """Rows as a reader must count them: the non-empty lines after the header, where LF, CRLF and CR (also one
    inside a field) each end a line, plus the undecodable lines."""
    pieces = re.split(r"\r\n|\r|\n", tsv_text(columns, lines, newline))[1:]
    return sum(1 for piece in pieces if piece) + (len(junk) if encoding != "utf-16" else 0)


def newlines(count: int):
    """One line terminator for a whole file (LF, CRLF, CR), or one per line (the header and ``count`` lines): a
    CRLF header over CR-only rows (a file edited on two systems), or any mix."""
    one = st.sampled_from(["\n", "\r\n", "\r"])
    return st.one_of(
        one,
        st.just(["\r\n"] + ["\r"] * count),
        st.lists(one, min_size=count + 1, max_size=count + 1),
    )


@st.composite
def releases(draw) -> dict:
    files = draw(clip_files())
    names = list(files)
    tsvs = {}
    for tsv in ("train", "dev", "test", "validated"):
        if tsv != "train" and draw(st.integers(0, 19)) == 10:
            continue  # a TSV the release lacks
        columns, lines = draw(tsv_lines(names, ANCHORS[tsv]))  # the same names in several TSVs: overlaps
        no_line_end = st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" "))
        junk = draw(st.lists(no_line_end, max_size=1))
        tsvs[tsv] = {
            "columns": columns,
            "lines": lines,
            "junk": junk,
            "newline": draw(newlines(len(lines))),
            "encoding": draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"])),
        }
    durations = None
    if draw(st.booleans()):
        durations = [f"{n}\t{draw(st.sampled_from(['0', 'nan', '-5', '1e12', 'x', '2500', '800', '900000']))}"
                     for n in draw(st.lists(st.sampled_from(names), max_size=4))]  # fmt: skip
    return {
        "files": files,
        "tsvs": tsvs,
        "durations": durations,
        "clips_folder": draw(st.integers(0, 39)) != 20,
        "archive": draw(st.sampled_from([None, None, None, "tar", "tar.gz", "cut"])),
    }


def materialize(spec: dict, where: Path) -> tuple[Path, dict[str, int]]:
    """Write the release under ``where``; returns its location (folder or archive) and rows per TSV."""
    root = where / "rel" / "cv-corpus-9.0-2022-04-27" / "es"
    root.mkdir(parents=True)
    if spec["clips_folder"]:
        materialize_clips(root / "clips", spec["files"])
    rows = {}
    for name, t in spec["tsvs"].items():
        (root / f"{name}.tsv").write_bytes(encode_tsv(t["columns"], t["lines"], t["newline"], t["encoding"], t["junk"]))
        rows[name] = expected_rows(t["columns"], t["lines"], t["newline"], t["junk"], t["encoding"])
    if spec["durations"] is not None:
        (root / "clip_durations.tsv").write_text("clip\tduration[ms]\n" + "\n".join(spec["durations"]) + "\n")
    if spec["archive"] is None:
        return root, rows
    archive = where / "rel" / ("cv-corpus-9.0-2022-04-27-es.tar" + (".gz" if spec["archive"] == "tar.gz" else ""))
    with tarfile.open(archive, "w:gz" if spec["archive"] == "tar.gz" else "w") as tar:
        tar.add(root.parent, arcname="cv-corpus-9.0-2022-04-27")
    if spec["archive"] == "cut":
        data = archive.read_bytes()
        archive.write_bytes(data[: len(data) // 2 // 512 * 512])
    return archive, rows


# ----------------------------------------------------------------------------------------------- options


options = st.fixed_dictionaries(
    {
        "--splits": one_in(
            12,
            st.sampled_from(["train,train", "dev,test,dev"]),
            st.permutations(["train", "dev", "test"]).flatmap(
                lambda p: st.integers(1, 3).map(lambda n: ",".join(p[:n]))
            ),
        ),
        "--shards": st.integers(1, 4).map(str),
        "--format": st.sampled_from(["wav", "tar"]),
        "--min-duration": one_in(3, st.sampled_from(["0", "1.5"]), st.just("0.5")),
        "--max-duration": one_in(3, st.just("3"), st.just("20")),
        "--train-source": st.sampled_from(["train", "train", "validated"]),
        "--workers": st.sampled_from(["1", "1", "1", "2"]),
    }
)


def option_args(chosen: dict) -> list[str]:
    return [x for pair in chosen.items() for x in pair]


def tsv_of(split: str, chosen: dict) -> str:
    return "validated" if split == "train" and chosen["--train-source"] == "validated" else split


# ------------------------------------------------------------------------------------------------ checks


def run_in_process(release: Path, out: Path, args: list[str], tmp: Path) -> tuple[int, str]:
    """``habla prepare`` through the CLI's main(), in this process: an exception escaping it is a traceback."""
    err = io.StringIO()
    if not logging.getLogger().handlers:  # else main() would bind its log handler to this run's stderr
        logging.getLogger().addHandler(logging.NullHandler())
    before = tempfile.tempdir
    tempfile.tempdir = str(tmp)
    try:
        with contextlib.redirect_stderr(err):
            code = cli.main(["prepare", "--release", str(release), "--out", str(out), *args])
    finally:
        tempfile.tempdir = before
    return code, err.getvalue()


def state_of(root: Path) -> dict[str, tuple]:
    """Every entry under root: files (inode, mtime, bytes), folders (inode, mtime), others (lstat)."""
    entries = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            entries[str(path)] = ("other", info.st_mode, os.readlink(path) if path.is_symlink() else "")
        elif path.is_dir():
            entries[str(path)] = ("dir", info.st_ino, info.st_mtime_ns)
        else:
            entries[str(path)] = ("file", info.st_ino, info.st_mtime_ns, path.read_bytes())
    return entries


def check_dataset(out: Path, rows: dict[str, int], chosen: dict, code: int, err: str) -> None:
    splits = chosen["--splits"].split(",")
    assert code in (0, 2), err
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("habla prepare: error:")]
        assert len(errors) == 1 and BAD_INPUT.search(errors[0]), err
    if not (out / "rejected.jsonl").exists():
        assert code == 2 and not (out / "manifests").exists()
        return
    manifests = {s: jsonl.loads((out / "manifests" / f"{s}.json").read_text(encoding="utf-8")) for s in splits}
    rejected = jsonl.loads((out / "rejected.jsonl").read_text(encoding="utf-8"))
    for split in splits:
        dropped = [r for r in rejected if r["split"] == split]
        assert len(manifests[split]) + len(dropped) == rows[tsv_of(split, chosen)], split
    assert {r["reason"] for r in rejected} <= DOCUMENTED_REASONS
    if code == 2:
        assert "passed the filters" in err and any(not m for m in manifests.values())
    shortest, longest = max(float(chosen["--min-duration"]), 0.1), float(chosen["--max-duration"])
    seen = set()
    members = _tar_members(out) if chosen["--format"] == "tar" else {}
    for split, entries in manifests.items():
        for e in entries:
            audio = e["audio_filepath"]
            key = (split, e.get("shard_id"), audio)
            assert key not in seen, f"two manifest lines share {key}"
            seen.add(key)
            data = members.pop((split, e["shard_id"], audio)) if "shard_id" in e else Path(audio).read_bytes()
            info = sf.info(io.BytesIO(data))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert abs(info.frames / 16000 - e["duration"]) < 1e-3
            if split == "test" and e.get("training_filter"):  # kept as the anchors keep it, marked
                assert e["training_filter"] in DOCUMENTED_REASONS and e["duration"] >= 0.1
                continue
            assert shortest <= e["duration"] <= longest
            assert set(e["text"]) <= set(ALPHABET) and e["text"]
            assert "training_filter" not in e
    assert not members, f"tar members no manifest line lists: {sorted(members)[:3]}"
    assert not list(out.rglob("*.part"))


def _tar_members(out: Path) -> dict[tuple[str, int, str], bytes]:
    """Every member of every split's tar shards: (split, shard, name) -> bytes (a name twice in one tar fails)."""
    members = {}
    for path in (out / "tarred").glob("*/audio_*.tar"):
        split, shard = path.parent.name, int(path.stem.split("_")[1])
        with tarfile.open(path) as tar:
            for m in tar:
                assert (split, shard, m.name) not in members, f"{path}: {m.name} twice"
                members[split, shard, m.name] = tar.extractfile(m).read()
    return members


def check_plan_equals_reference(out: Path) -> None:
    """The plan's files are those the row-by-row planner of earlier versions writes (tests/data/plan_reference.py)
    from the same tables, byte for byte: the column filters and the fast reader change nothing."""
    if not (out / "plan" / "plan.json").exists():
        return
    summary = json.loads((out / "plan" / "plan.json").read_text(encoding="utf-8"))
    reference = plan_reference.build_plan(summary["root"], PrepareOptions.from_json(summary["options"]))
    files = reference.files()
    for k in range(summary["num_shards"]):
        assert (out / "plan" / f"shard-{k:05d}.jsonl").read_bytes() == files[f"shard-{k:05d}.jsonl"], k
    assert (out / "plan" / "rejected.jsonl").read_bytes() == files["rejected.jsonl"]
    assert summary["rows_read"] == reference.rows_read
    assert [s["clips"] for s in summary["shards"]] == [len(s) for s in reference.shards]


# -------------------------------------------------------------------------------------------- properties


def check_hostile_release(spec: dict, chosen: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="habla-hostile-") as where:
        where = Path(where)
        release, rows = materialize(spec, where)
        out, tmp = where / "out", where / "tmp"
        tmp.mkdir()
        outside = state_of(where / "rel")
        code, err = run_in_process(release, out, option_args(chosen), tmp)
        assert "Traceback" not in err
        check_dataset(out, rows, chosen, code, err)
        kept = sum(len(jsonl.loads(p.read_text(encoding="utf-8"))) for p in out.glob("manifests/*.json"))
        event(f"exit {code}, {'no' if not kept else '1-3' if kept < 4 else '4+'} clips kept")
        if code == 2:
            event(f"bad input: {BAD_INPUT.search(err)[0]}")
        if (out / "rejected.jsonl").exists():
            for reason in {r["reason"] for r in jsonl.loads((out / "rejected.jsonl").read_text(encoding="utf-8"))}:
                event(f"rejected as {reason}")
        check_plan_equals_reference(out)
        assert state_of(where / "rel") == outside, "the release was changed"
        assert sorted(p.name for p in where.iterdir()) == sorted(["rel", "tmp", *(["out"] if out.exists() else [])])
        assert not list(tmp.iterdir()), "temporary files left behind"
        if out.exists():
            first = state_of(out)
            again, err_again = run_in_process(release, out, option_args(chosen), tmp)
            assert again == code and "Traceback" not in err_again
            assert state_of(out) == first, "the second run changed DST"


@profile()
@given(spec=releases(), chosen=options)
def test_hostile_releases_keep_every_promise(spec, chosen):
    check_hostile_release(spec, chosen)


@pytest.mark.hostile_long
@profile(max_examples=PROFILES["long"]["max_examples"], deadline=None, derandomize=False)
@given(spec=releases(), chosen=options)
def test_hostile_releases_keep_every_promise_long(spec, chosen):
    check_hostile_release(spec, chosen)


# ------------------------------------------------------------------------------------- kill and resume


def _comparable(out: Path) -> dict[str, bytes]:
    """Every file of a finished dataset with its own location written as @ (two DSTs differ only there)."""
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and "staging" not in path.parts:
            files[str(path.relative_to(out))] = path.read_bytes().replace(str(out).encode(), b"@")
    files.pop("plan/claim.json")  # says which process claimed the folder, and when
    for name in [n for n in files if re.fullmatch(r"shards/shard-\d+\.json", n)]:  # a shard's timings
        summary = jsonl.loads_line(files[name].decode())
        files[name] = {k: v for k, v in summary.items() if k not in ("wall_seconds", "parent_cpu_seconds")}
    return files


@profile(max_examples=KILL_EXAMPLES, deadline=None)
@given(
    clips=st.integers(6, 14),
    broken=st.lists(st.sampled_from(["empty", "silence", "random", "link_zero", "missing"]), max_size=3),
    chosen=st.fixed_dictionaries(
        {
            "--shards": st.integers(1, 3).map(str),
            "--format": st.sampled_from(["wav", "tar"]),
            "--workers": st.sampled_from(["1", "2"]),
        }  # fmt: skip
    ),
    archive=st.booleans(),
    kills=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=2),
)
def test_a_killed_run_resumes_to_the_identical_result(clips, broken, chosen, archive, kills):
    files = {f"c{k}.mp3": ("real", k % len(REAL)) for k in range(clips)}
    files.update({f"b{k}.mp3": (kind, b"\x00junk" if kind == "random" else None) for k, kind in enumerate(broken)})
    names = sorted(files)
    lines = ["\t".join([f"spk{k % 3}", n, GOOD_SENTENCES[k % 5], "", "", "", "es"]) for k, n in enumerate(names)]
    tsv = {"columns": list(SMALL_HEADER), "lines": lines, "junk": [], "newline": "\n", "encoding": "utf-8"}
    dev = {**tsv, "lines": ["\t".join(["spkd", "c0.mp3", "hola", "", "", "", "es"])]}  # a real clip, in train too
    spec = {"files": files, "tsvs": {"train": tsv, "dev": dev}, "durations": None, "clips_folder": True,
            "archive": "tar" if archive else None}  # fmt: skip
    args = ["--splits", "train,dev", *option_args(chosen)]
    with tempfile.TemporaryDirectory(prefix="habla-kill-") as where:
        where = Path(where)
        release, _ = materialize(spec, where)
        tmp = where / "tmp"
        tmp.mkdir()
        env = cli_env(TMPDIR=str(tmp))
        command = [HABLA, "prepare", "--release", str(release), *args]
        started = time.monotonic()
        reference = subprocess.run([*command, "--out", str(where / "reference")], capture_output=True, env=env)
        took = time.monotonic() - started
        out = where / "killed"
        for fraction in kills:
            proc = subprocess.Popen([*command, "--out", str(out)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=env)  # fmt: skip
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=fraction * took)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        resumed = subprocess.run([*command, "--out", str(out)], capture_output=True, env=env)
        assert resumed.returncode == reference.returncode, resumed.stderr.decode()[-2000:]
        event(f"reference run: exit {reference.returncode}")
        assume(reference.returncode == 0)
        assert _comparable(out) == _comparable(where / "reference")
        assert not list(out.rglob("*.part")) and not list(out.rglob("*.started"))
        assert not list(tmp.iterdir()), "a killed run's temporary folder was not cleaned up"
        deadline = time.monotonic() + 10
        while _processes_naming(out) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _processes_naming(out), "a killed run's worker processes outlived it"


def _processes_naming(path: Path) -> list[int]:
    """Processes whose command line names ``path`` (a killed run's orphaned workers would)."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and str(path).encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
    return found
