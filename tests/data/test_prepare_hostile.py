"""habla prepare under hostile input, one test per class of defect the data-integrity issue (#9) found: the case
it reported and at least one sibling. Small hand-made releases of real speech clips keep each run to a second.

The promises: every TSV row ends in exactly one manifest line or one rejected.jsonl line; a re-run rewrites
nothing and a killed run resumes to the identical result; bad input gets one line and exit 2, never a traceback.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fixtures.commands import HABLA, cli_env, read_jsonl, run_habla
from fixtures.releases import MINI, real_clips, tsv_row, write_release

from habla import cli
from habla.core import storage
from habla.core.errors import HablaError
from habla.data import archive as archive_pass
from habla.data import dataset, plan
from habla.data import prepare as prep
from habla.data.filters import build_plan
from habla.data.options import PrepareOptions, fingerprint
from habla.speech import audio
from habla.speech import manifests as nemo_data

CLIPS = real_clips(8)


def prepare(release: Path, out: Path, *args: str, capsys=None) -> tuple[int, str]:
    """``habla prepare`` in this process (the CLI's exception handling included): (exit code, stderr)."""
    code = cli.main(["prepare", "--release", str(release), "--out", str(out), "--workers", "1", "--shards", "2", *args])
    return code, capsys.readouterr().err if capsys else ""


def outcome(out: Path) -> tuple[dict[str, dict[str, dict]], dict[str, list[str]]]:
    """Manifest entries by split and path; rejection reasons by path."""
    manifests = {p.stem: {e["path"]: e for e in read_jsonl(p)} for p in (out / "manifests").glob("*.json")}
    reasons: dict[str, list[str]] = {}
    for r in read_jsonl(out / "rejected.jsonl"):
        reasons.setdefault(r["path"], []).append(r["reason"])
    return manifests, reasons


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file under root: (inode, mtime, bytes)."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def two_split_release(root: Path, train: list[dict], clips: dict, dev: list[dict] | None = None) -> Path:
    """A release with train and dev (dev gets one good clip unless given)."""
    dev = dev if dev is not None else [tsv_row("dev0.mp3", client_id="d")]
    return write_release(root, {"train": train, "dev": dev}, {"dev0.mp3": CLIPS[7], **clips})


SPLITS = ("--splits", "train,dev")


# ------------------------------------------------------------------------- JSON lines and Unicode line breaks


def test_unicode_line_breaks_in_sentences_survive_every_reader(tmp_path, capsys):
    train = [
        tsv_row("a.mp3", "hola\u2028que tal"),  # U+2028 is a space to the normalizer: the row is kept
        tsv_row("b.mp3", "buenos días", client_id="spk\u2028x", accents="Méx\u2029ico"),  # metadata verbatim
        tsv_row("c.mp3", "uno\x85dos\x0ctres"),  # NEL and form feed are white space too
        tsv_row("d.mp3", "uno\x07dos"),  # a bell is not: rejected, with a reason
    ]
    clips = {"a.mp3": CLIPS[0], "b.mp3": CLIPS[1], "c.mp3": CLIPS[2], "d.mp3": CLIPS[3]}
    release = two_split_release(tmp_path / "rel", train, clips)
    out = tmp_path / "out"
    assert prepare(release, out, *SPLITS, capsys=capsys)[0] == 0
    before = snapshot(out)
    assert prepare(release, out, *SPLITS, capsys=capsys)[0] == 0, "the re-run crashed on its own manifests"
    assert snapshot(out) == before
    manifests, reasons = outcome(out)
    assert manifests["train"]["a.mp3"]["sentence"] == "hola\u2028que tal"
    assert manifests["train"]["b.mp3"]["client_id"] == "spk\u2028x"
    assert manifests["train"]["c.mp3"]["text"] == "uno dos tres"
    assert reasons == {"d.mp3": ["unsupported_chars"]}
    # training reads the same lines (it called them "not JSON" before)
    train_manifest = nemo_data.read_manifest(str(out / "manifests" / "train.json"))
    assert [e["path"] for e in train_manifest] == ["a.mp3", "b.mp3", "c.mp3"]


# --------------------------------------------------------------------------------------- relative paths


def test_a_relative_release_continued_from_another_folder(tmp_path):
    write_release(tmp_path / "a" / "rel", {"train": [tsv_row("x.mp3")], "dev": [tsv_row("d.mp3", client_id="d")]},
                  {"x.mp3": CLIPS[0], "d.mp3": CLIPS[1]})  # fmt: skip
    (tmp_path / "b" / "rel").mkdir(parents=True)  # another folder with the same relative name, no clips
    out = tmp_path / "out"

    def run(cwd: str, *args: str) -> subprocess.CompletedProcess:
        command = [HABLA, "prepare", "--out", str(out), "--shards", "1", "--workers", "1", *SPLITS, *args]
        return subprocess.run(command, cwd=tmp_path / cwd, capture_output=True, text=True, env=cli_env())

    assert run("a", "--release", "rel", "--step", "plan").returncode == 0
    assert run("b", "--step", "convert").returncode == 0  # reads the clips of a/rel, not b/rel
    done = run("b", "--release", "../a/rel/", "--step", "all")  # the same release, named another way
    assert done.returncode == 0, done.stderr
    manifests, reasons = outcome(out)
    assert list(manifests["train"]) == ["x.mp3"] and not reasons
    assert json.loads((out / "plan" / "plan.json").read_text())["release"] == str(tmp_path / "a" / "rel")
    refused = run("b", "--release", "rel")  # b/rel is another release
    assert refused.returncode == 2 and "another release" in refused.stderr


# ----------------------------------------------------------------------------------------- output names


@pytest.mark.parametrize("fmt", ["wav", "tar"])
def test_clips_whose_stems_collide_get_their_own_audio(tmp_path, capsys, fmt):
    """x.mp3 and x.wav in one split pointed to one WAV; X.mp3 and x.mp3 collide on a case-insensitive disk."""
    names = ["x.mp3", "x.wav", "X.mp3", "x.wav.mp3"]
    wav = io.BytesIO()
    sf.write(wav, sf.read(CLIPS[1])[0], 48000, format="WAV")
    clips = {"x.mp3": CLIPS[0], "x.wav": wav.getvalue(), "X.mp3": CLIPS[2], "x.wav.mp3": CLIPS[3]}
    release = two_split_release(tmp_path / "rel", [tsv_row(n) for n in names], clips)
    out = tmp_path / "out"
    assert prepare(release, out, *SPLITS, "--format", fmt, capsys=capsys)[0] == 0
    manifests, reasons = outcome(out)
    assert sorted(manifests["train"]) == sorted(names) and not reasons
    targets = [e["audio_filepath"] for e in manifests["train"].values()]
    assert len({t.casefold() for t in targets}) == 4
    durations = {n: round(sf.info(c if isinstance(c, Path) else io.BytesIO(c)).duration, 1) for n, c in clips.items()}
    if fmt == "wav":
        for name, entry in manifests["train"].items():
            assert round(sf.info(entry["audio_filepath"]).duration, 1) == durations[name], name
    else:
        members = {}
        for tar_path in (out / "tarred" / "train").glob("audio_*.tar"):
            with tarfile.open(tar_path) as tar:
                members.update({m.name: tar.extractfile(m).read() for m in tar})
        for name, entry in manifests["train"].items():
            assert round(sf.info(io.BytesIO(members[entry["audio_filepath"]])).duration, 1) == durations[name]


# ------------------------------------------------------------------------------ OS limits become row reasons


def test_long_clip_names_are_kept_or_rejected_never_fatal(tmp_path, capsys):
    long_250 = "a" * 246 + ".mp3"  # 250 bytes: a valid name (its temporary name was not)
    long_120 = "b" * 116 + ".mp3"  # over ustar's 100 bytes: fine in a PAX tar
    long_300 = "c" * 296 + ".mp3"  # no file system takes it
    release = two_split_release(
        tmp_path / "rel",
        [tsv_row(long_250), tsv_row(long_120), tsv_row(long_300)],
        {long_250: CLIPS[0], long_120: CLIPS[1]},
    )
    for fmt in ("wav", "tar"):
        out = tmp_path / f"out-{fmt}"
        assert prepare(release, out, *SPLITS, "--format", fmt, capsys=capsys)[0] == 0
        manifests, reasons = outcome(out)
        assert sorted(manifests["train"]) == sorted([long_250, long_120])
        assert reasons == {long_300: ["name_too_long"]}


# --------------------------------------------------------------------------------- state files and archives


def _archive(path: Path, release: Path, top: str = "cv-corpus-1.0-2020-01-01") -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        tar.add(release, arcname=f"{top}/es")
    return path


def test_a_dataset_is_tied_to_its_archive_content(tmp_path, capsys):
    first = two_split_release(tmp_path / "one", [tsv_row("a.mp3")], {"a.mp3": CLIPS[0]})
    second_clips = {"b.mp3": CLIPS[1], "c.mp3": CLIPS[2]}
    second = two_split_release(tmp_path / "two", [tsv_row("b.mp3"), tsv_row("c.mp3")], second_clips)
    archive, out = tmp_path / "cv.tar", tmp_path / "out"
    _archive(archive, first)
    assert prepare(archive, out, *SPLITS, capsys=capsys)[0] == 0
    shutil.copy(_archive(tmp_path / "other.tar", second), archive)  # another archive at the same path
    code, err = prepare(archive, out, *SPLITS, capsys=capsys)
    assert code == 2 and "changed since" in err and len(err.strip().splitlines()) == 1
    assert list(outcome(out)[0]["train"]) == ["a.mp3"]  # the dataset was not touched

    # A staging left by a run killed before it planned is not reused for another archive.
    out2 = tmp_path / "out2"
    stage_only(archive, out2)
    _archive(archive, first)
    assert prepare(archive, out2, *SPLITS, capsys=capsys)[0] == 0
    assert list(outcome(out2)[0]["train"]) == ["a.mp3"]


def stage_only(archive: Path, out: Path) -> None:
    """What a run killed after staging ``archive`` (with :func:`prepare`'s options) and before planning leaves."""
    options = PrepareOptions(splits=("train", "dev"), shards=2)
    release = plan.canonical_release(str(archive))

    def route(root: str) -> tuple[dict[str, int], int]:
        planned = build_plan(root, options)
        return planned.routing(), len(planned.shards)

    archive_pass.stage(release, str(out / "staging"), "es", fingerprint(release, options), 10**8, route)


def test_a_run_unpacking_an_archive_is_not_disturbed_by_one_with_another(tmp_path, capsys):
    """Staging is claimed first: a second run with another archive is refused before it touches staging/."""
    first = _archive(tmp_path / "one.tar", two_split_release(tmp_path / "one", [tsv_row("a.mp3")], {"a.mp3": CLIPS[0]}))
    second = _archive(
        tmp_path / "two.tar", two_split_release(tmp_path / "two", [tsv_row("b.mp3")], {"b.mp3": CLIPS[1]})
    )
    out = tmp_path / "out"
    # the first run, caught while it unpacks: its claim is made, its staging half written
    options = PrepareOptions(splits=("train", "dev"), shards=2)
    assert plan._claim(str(out), plan.canonical_release(str(first)), options)
    stage_only(first, out)
    staged = snapshot(out / "staging")
    code, err = prepare(second, out, *SPLITS, capsys=capsys)
    assert code == 2 and "is for another release" in err and len(err.strip().splitlines()) == 1
    assert snapshot(out / "staging") == staged
    assert prepare(first, out, *SPLITS, capsys=capsys)[0] == 0  # the first run, started again, finishes
    assert list(outcome(out)[0]["train"]) == ["a.mp3"]


def test_a_truncated_archive_is_refused_and_the_fixed_one_is_used(tmp_path, capsys):
    release = two_split_release(tmp_path / "rel", [tsv_row(f"{k}.mp3") for k in range(4)],
                                {f"{k}.mp3": CLIPS[k] for k in range(4)})  # fmt: skip
    whole = _archive(tmp_path / "whole.tar", release).read_bytes()
    archive, out = tmp_path / "cv.tar", tmp_path / "out"
    with tarfile.open(tmp_path / "whole.tar") as tar:
        last = tar.getmembers()[-1]
    archive.write_bytes(whole[: last.offset])  # cut at a member boundary: tarfile reads it without complaint
    code, err = prepare(archive, out, *SPLITS, capsys=capsys)
    assert code == 2 and "incomplete archive" in err
    assert not (out / "plan" / "plan.json").exists() and not (out / "plan" / "claim.json").exists()
    archive.write_bytes(whole)  # the full archive arrives at the same path
    assert prepare(archive, out, *SPLITS, capsys=capsys)[0] == 0
    assert sorted(outcome(out)[0]["train"]) == [f"{k}.mp3" for k in range(4)]


def test_a_changed_release_folder_or_a_corrupt_state_file(tmp_path, capsys):
    release = two_split_release(tmp_path / "rel", [tsv_row("a.mp3"), tsv_row("b.mp3")],
                                {"a.mp3": CLIPS[0], "b.mp3": CLIPS[1]})  # fmt: skip
    out = tmp_path / "out"
    assert prepare(release, out, *SPLITS, "--step", "plan", capsys=capsys)[0] == 0
    (out / "shards").mkdir()
    (out / "shards" / "shard-00000.json").write_text('{"shard": 0, "splits": ')  # corrupt: converted again
    assert prepare(release, out, *SPLITS, capsys=capsys)[0] == 0
    assert sorted(outcome(out)[0]["train"]) == ["a.mp3", "b.mp3"]
    # rebuilt with the same content (data/build_mini_release.py does this): new file times, the same release
    for tsv in release.glob("*.tsv"):
        tsv.write_bytes(tsv.read_bytes())
        os.utime(tsv, (1_000_000_000, 1_000_000_000))
    assert prepare(release, out, *SPLITS, capsys=capsys)[0] == 0
    with (release / "train.tsv").open("a") as f:
        f.write("spk\tc.mp3\thola\t\t\t\tes\n")
    code, err = prepare(release, out, *SPLITS, capsys=capsys)
    assert code == 2 and "train.tsv changed since" in err
    (out / "plan" / "plan.json").write_text("{not json")
    code, err = prepare(release, out, *SPLITS, capsys=capsys)
    assert code == 2 and "plan.json: corrupt" in err and "Traceback" not in err
    (out / "plan" / "plan.json").write_text(json.dumps({"version": dataset.PLAN_VERSION}))  # JSON, fields missing
    code, err = prepare(release, out, *SPLITS, capsys=capsys)
    assert code == 2 and "plan.json: corrupt (no release" in err and "Traceback" not in err


def test_a_release_with_times_txt_only_is_planned_from_a_folder(tmp_path, capsys):
    """14.0-style releases carry their durations in times.txt: it is recorded as an input as it is."""
    release = two_split_release(tmp_path / "rel", [tsv_row("a.mp3")], {"a.mp3": CLIPS[0]})
    (release / "times.txt").write_text("a.mp3\t1500\ndev0.mp3\t1500\n")
    out = tmp_path / "out"
    assert prepare(release, out, *SPLITS, capsys=capsys)[0] == 0
    assert "times.txt" in json.loads((out / "plan" / "plan.json").read_text())["inputs"]
    assert prepare(release, out, *SPLITS, capsys=capsys)[0] == 0  # and re-checked unchanged


@pytest.mark.parametrize("sidecar", [b"\xff\xfe not utf-8 at all", "folder"])
def test_a_sidecar_that_is_not_a_checksum_is_one_line(tmp_path, capsys, sidecar):
    release = two_split_release(tmp_path / "rel", [tsv_row("a.mp3")], {"a.mp3": CLIPS[0]})
    archive = _archive(tmp_path / "cv.tar", release)
    if sidecar == "folder":
        (tmp_path / "cv.tar.sha256").mkdir()
    else:
        (tmp_path / "cv.tar.sha256").write_bytes(sidecar)
    code, err = prepare(archive, tmp_path / "out", *SPLITS, capsys=capsys)
    assert code == 2 and "cv.tar.sha256: not a" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "plan" / "claim.json").exists()  # the failed run left the folder free


# ---------------------------------------------------------------------------------------- line endings


def test_a_cr_only_release_is_read_row_by_row(tmp_path, capsys):
    rows = [tsv_row(f"{k}.mp3") for k in range(3)]
    release = write_release(tmp_path / "rel", {"train": rows, "dev": [tsv_row("d.mp3", client_id="d")]},
                            {**{f"{k}.mp3": CLIPS[k] for k in range(3)}, "d.mp3": CLIPS[5]}, newline="\r")  # fmt: skip
    (release / "clip_durations.tsv").write_bytes(b"clip\tduration[ms]\r0.mp3\t99999\r")  # CR-only too
    out = tmp_path / "out"
    assert prepare(release, out, *SPLITS, capsys=capsys)[0] == 0
    manifests, reasons = outcome(out)
    assert sorted(manifests["train"]) == ["1.mp3", "2.mp3"] and reasons == {"0.mp3": ["too_long"]}
    assert json.loads((out / "report.json").read_text())["accounting"]["rows_read"] == 4


# ------------------------------------------------------------------------------------------- file modes


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_outputs_are_readable_as_the_umask_says(tmp_path, umask, file_mode, dir_mode):
    release = two_split_release(tmp_path / "rel", [tsv_row("a.mp3")], {"a.mp3": CLIPS[0]})
    out = tmp_path / "out"
    command = [HABLA, "prepare", "--release", str(release), "--out", str(out), "--shards", "1", *SPLITS]
    subprocess.run(command, check=True, capture_output=True, env=cli_env(), umask=umask)
    modes = Counter(stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file())
    assert modes == {file_mode: sum(modes.values())} and sum(modes.values()) > 10
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_dir()} == {dir_mode}


# ------------------------------------------------------------------------------------------- concurrency


def test_concurrent_runs_cooperate_or_the_later_one_is_refused(tmp_path):
    release = two_split_release(tmp_path / "rel", [tsv_row(f"{k}.mp3") for k in range(6)],
                                {f"{k}.mp3": CLIPS[k] for k in range(6)})  # fmt: skip
    out = tmp_path / "out"

    def start(shards: str) -> subprocess.Popen:
        command = [HABLA, "prepare", "--release", str(release), "--out", str(out), "--shards", shards, "--workers", "1",
                   *SPLITS]  # fmt: skip
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())

    first = start("4")
    time.sleep(1.6)
    later = start("3")
    same = start("4")  # the same options: it cooperates
    results = {name: (p.wait(timeout=120), p.stderr.read()) for name, p in (("first", first), ("later", later),
                                                                            ("same", same))}  # fmt: skip
    assert results["first"][0] == 0 and results["same"][0] == 0, results
    assert results["later"][0] == 2 and "other options" in results["later"][1], results["later"][1]
    assert len(results["later"][1].strip().splitlines()) == 1
    again = run_habla("prepare", "--release", str(release), "--out", str(out), "--shards", "4", *SPLITS)
    assert again.returncode == 0, again.stderr  # not poisoned
    assert sorted(outcome(out)[0]["train"]) == [f"{k}.mp3" for k in range(6)]


def test_the_claim_works_on_s3(s3_bucket, tmp_path):
    release = two_split_release(tmp_path / "rel", [tsv_row("a.mp3")], {"a.mp3": CLIPS[0]})
    out = f"{s3_bucket}/dataset"
    prep.plan(str(release), out, PrepareOptions(shards=2, splits=("train", "dev")))
    with pytest.raises(HablaError, match="other options"):
        prep.plan(str(release), out, PrepareOptions(shards=3, splits=("train", "dev")))
    storage.delete(f"{out}/plan/plan.json")  # as if the first run were still planning
    with pytest.raises(HablaError, match="another release or other options"):
        prep.plan(str(release), out, PrepareOptions(shards=3, splits=("train", "dev")))
    assert prep.plan(str(release), out, PrepareOptions(shards=2, splits=("dev", "train")))["num_shards"] == 2


# -------------------------------------------------------------------------------- re-runs rewrite nothing


def test_a_complete_dataset_is_not_rewritten_and_rejections_are_deterministic(tmp_path, capsys):
    garbage = b"not audio at all " * 40
    release = two_split_release(tmp_path / "rel", [tsv_row("a.mp3"), tsv_row("bad.mp3"), tsv_row("gone.mp3")],
                                {"a.mp3": CLIPS[0], "bad.mp3": garbage})  # fmt: skip
    outs = [tmp_path / "out1", tmp_path / "out2"]
    for out in outs:
        assert prepare(release, out, *SPLITS, capsys=capsys)[0] == 0
    rejected = (outs[0] / "rejected.jsonl").read_text()
    assert "0x" not in rejected and "BytesIO" not in rejected  # it held <_io.BytesIO object at 0x7f…>
    assert rejected == (outs[1] / "rejected.jsonl").read_text()
    before = snapshot(outs[0])
    time.sleep(0.01)
    assert prepare(release, outs[0], *SPLITS, capsys=capsys)[0] == 0
    assert snapshot(outs[0]) == before, "manifests and reports got new inodes or mtimes"


def test_a_resumed_shard_removes_what_a_killed_writer_left(tmp_path, capsys):
    release = two_split_release(tmp_path / "rel", [tsv_row("a.mp3")], {"a.mp3": CLIPS[0]})
    out = tmp_path / "out"
    assert prepare(release, out, *SPLITS, "--step", "plan", capsys=capsys)[0] == 0
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = out / "audio" / "train" / f".a.wav.{storage.host_tag()}-{dead.pid}-7.part"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a WAV")
    for k in range(2):
        (out / "shards").mkdir(exist_ok=True)
        (out / "shards" / f"shard-{k:05d}.started").write_text("")  # as a killed run leaves them
    assert prepare(release, out, *SPLITS, capsys=capsys)[0] == 0
    assert not list(out.rglob("*.part")) and not list(out.rglob("*.started"))


# -------------------------------------------------------------------------------------- degenerate audio


def _wav(samples, rate: int = 48000, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(samples, dtype=np.float32), rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def test_degenerate_audio_is_rejected_not_divided_by(tmp_path, capsys):
    rng = np.random.default_rng(0)
    speech, _ = sf.read(CLIPS[0], dtype="float32")
    nan = rng.normal(0, 0.1, 48000).astype(np.float32)
    nan[100] = np.nan
    clips = {
        "one.mp3": _wav([0.5]),  # one sample
        "three.mp3": _wav([0.3, -0.4, 0.2]),  # three samples
        "zero.mp3": CLIPS[1],  # 0 ms in the duration table: measured instead
        "nan.mp3": _wav(nan, subtype="FLOAT"),
        "silence.mp3": _wav(np.zeros(5 * 48000)),  # 5 s of digital silence with a sentence
        "hiss.mp3": _wav(rng.normal(0, 10 ** (-70 / 20), 3 * 48000)),  # -70 dBFS of noise
        "quiet.mp3": _wav(0.05 * speech / np.abs(speech).max()),  # quiet speech (~ -40 dBFS) is kept
    }
    release = two_split_release(tmp_path / "rel", [tsv_row(n) for n in clips], clips)
    (release / "clip_durations.tsv").write_text("clip\tduration[ms]\nzero.mp3\t0\none.mp3\tnan\n")
    out = tmp_path / "out"
    assert (
        prepare(release, out, *SPLITS, "--min-duration", "0", "--max-chars-per-second", "1000", capsys=capsys)[0] == 0
    )
    manifests, reasons = outcome(out)
    assert sorted(manifests["train"]) == ["quiet.mp3", "zero.mp3"]
    assert reasons == {"one.mp3": ["too_short"], "three.mp3": ["too_short"], "nan.mp3": ["decode_error"],
                       "silence.mp3": ["silent"], "hiss.mp3": ["silent"]}  # fmt: skip


# -------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--splits", "train,train"], "names train more than once"), (["--splits", "dev,dev,test"], "dev more than once"),
     (["--min-duration", "nan"], "finite number"), (["--max-duration", "inf"], "finite number"),
     (["--shards", "100000000"], "--shards must be an integer from 1"), (["--locale", "../x"], "--locale")],
)  # fmt: skip
def test_bad_options_are_one_line(tmp_path, capsys, args, message):
    code, err = prepare(MINI, tmp_path / "out", *args, capsys=capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_splits_in_another_order_are_the_same_dataset(tmp_path, capsys):
    release = two_split_release(tmp_path / "rel", [tsv_row("a.mp3")], {"a.mp3": CLIPS[0]})
    out = tmp_path / "out"
    assert prepare(release, out, "--splits", "dev,train", capsys=capsys)[0] == 0
    assert prepare(release, out, "--splits", "train,dev", capsys=capsys)[0] == 0


# ------------------------------------------------------------------------------ untrusted sizes and types


def test_clips_that_are_not_regular_files(tmp_path, capsys):
    release = two_split_release(
        tmp_path / "rel",
        [tsv_row(n) for n in ("zero.mp3", "fifo.mp3", "folder.mp3", "loop.mp3", "link.mp3", "dangling.mp3")],
        {},
    )
    clips = release / "clips"
    os.symlink("/dev/zero", clips / "zero.mp3")  # MemoryError before
    os.mkfifo(clips / "fifo.mp3")  # a hang before
    (clips / "folder.mp3").mkdir()
    os.symlink(clips / "loop.mp3", clips / "loop.mp3")
    os.symlink(CLIPS[0], clips / "link.mp3")  # a symlink to a real clip is read
    os.symlink(tmp_path / "nowhere", clips / "dangling.mp3")
    out = tmp_path / "out"
    assert prepare(release, out, *SPLITS, capsys=capsys)[0] == 0
    manifests, reasons = outcome(out)
    assert list(manifests["train"]) == ["link.mp3"]
    assert reasons == {"zero.mp3": ["not_a_file"], "fifo.mp3": ["not_a_file"], "folder.mp3": ["not_a_file"],
                       "loop.mp3": ["not_a_file"], "dangling.mp3": ["missing_clip"]}  # fmt: skip


def test_oversized_clips_are_rejected_without_being_read(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(audio, "MAX_CLIP_BYTES", 200_000)
    big = _wav(np.random.default_rng(1).normal(0, 0.1, 150_000))  # 300 kB
    release = two_split_release(tmp_path / "rel", [tsv_row("big.mp3"), tsv_row("a.mp3")],
                                {"big.mp3": big, "a.mp3": CLIPS[0]})  # fmt: skip
    out = tmp_path / "out"
    assert prepare(release, out, *SPLITS, capsys=capsys)[0] == 0
    assert outcome(out)[1] == {"big.mp3": ["too_large"]}
    archive = _archive(tmp_path / "cv.tar.gz", release)  # the same from an archive: not even unpacked
    assert prepare(archive, tmp_path / "out2", *SPLITS, capsys=capsys)[0] == 0
    assert outcome(tmp_path / "out2")[1] == {"big.mp3": ["too_large"]}
    assert not (tmp_path / "out2" / "staging" / "es" / "clips" / "big.mp3").exists()


# ---------------------------------------------------------------------------------------- data quality


def test_a_clip_in_both_dev_and_test_is_kept_once_in_test(tmp_path, capsys):
    """The test split is scored as the published anchors score it: a clip listed in both stays in test."""
    rows = {
        "train": [tsv_row("t.mp3")],
        "dev": [tsv_row("shared.mp3", client_id="d"), tsv_row("d.mp3", client_id="d")],
        "test": [tsv_row("shared.mp3", client_id="d"), tsv_row("e.mp3", client_id="e")],
    }
    clips = {"t.mp3": CLIPS[0], "shared.mp3": CLIPS[1], "d.mp3": CLIPS[2], "e.mp3": CLIPS[3]}
    release = write_release(tmp_path / "rel", rows, clips)
    for splits in ("train,dev,test", "dev,test"):
        out = tmp_path / splits
        assert prepare(release, out, "--splits", splits, capsys=capsys)[0] == 0
        manifests, reasons = outcome(out)
        assert "shared.mp3" in manifests["test"] and "shared.mp3" not in manifests["dev"]
        assert [r for r in read_jsonl(out / "rejected.jsonl")] == [
            {"split": "dev", "path": "shared.mp3", "reason": "eval_overlap", "detail": "clip also listed in test",
             "line": 2}]  # fmt: skip


def test_a_release_without_usable_audio_is_bad_input(tmp_path, capsys):
    rows = {"train": [tsv_row("a.mp3")], "dev": [tsv_row("d.mp3", client_id="d")]}
    no_clips = write_release(tmp_path / "noclips", rows)
    shutil.rmtree(no_clips / "clips")
    code, err = prepare(no_clips, tmp_path / "out1", *SPLITS, capsys=capsys)
    assert code == 2 and "no clips/ folder" in err and not (tmp_path / "out1" / "plan" / "plan.json").exists()
    silent = write_release(tmp_path / "silent", rows, {"a.mp3": _wav(np.zeros(48000)), "d.mp3": CLIPS[0]})
    code, err = prepare(silent, tmp_path / "out2", *SPLITS, capsys=capsys)
    assert code == 2 and "no clip of train passed the filters (silent: 1)" in err
    # the rows are still accounted for, and a re-run says the same
    assert [r["reason"] for r in read_jsonl(tmp_path / "out2" / "rejected.jsonl")] == ["silent"]
    assert prepare(silent, tmp_path / "out2", *SPLITS, capsys=capsys)[0] == 2


# ---------------------------------------------------------------------------------------- exit codes


def test_a_storage_fault_is_exit_1_in_one_line(tmp_path):
    release = two_split_release(tmp_path / "rel", [tsv_row("a.mp3")], {"a.mp3": CLIPS[0]})
    out = tmp_path / "out"
    assert run_habla("prepare", "--release", str(release), "--out", str(out), "--step", "plan", *SPLITS).returncode == 0
    (out / "audio").write_text("a file where the audio folder goes")  # writing a WAV under it fails: ENOTDIR
    result = run_habla("prepare", "--release", str(release), "--out", str(out), *SPLITS)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("habla prepare: error:")]
    assert len(errors) == 1 and "NotADirectoryError" in errors[0] and "Traceback" not in result.stderr


def test_kill_at_a_random_moment_resumes_to_the_same_result(tmp_path):
    """One deterministic instance of the kill-and-resume property (test_prepare_properties.py randomizes it)."""
    release = two_split_release(tmp_path / "rel", [tsv_row(f"{k}.mp3") for k in range(6)],
                                {f"{k}.mp3": CLIPS[k] for k in range(6)})  # fmt: skip
    reference, out = tmp_path / "reference", tmp_path / "killed"
    args = ["--release", str(release), "--shards", "2", "--workers", "1", *SPLITS]
    assert run_habla("prepare", "--out", str(reference), *args).returncode == 0
    proc = subprocess.Popen([HABLA, "prepare", "--out", str(out), *args], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    while not list(out.glob("audio/train/*.wav")) and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run_habla("prepare", "--out", str(out), *args).returncode == 0
    for name in ("manifests/train.json", "manifests/dev.json", "rejected.jsonl"):
        assert (out / name).read_text().replace(str(out), "@") == (reference / name).read_text().replace(
            str(reference), "@"
        )
    assert not list(out.rglob("*.part"))


_KILLED_PARENT = r"""
import os, signal, sys, time
from habla.data import convert

def work(seconds):
    time.sleep(seconds)
    return seconds

for n, _ in enumerate(convert._map(work, [0, 0, 0, 30], 2)):
    if n == 2:  # one worker sleeps, the other waits for work: the parent is killed now
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_parent_leaves_no_worker_processes(tmp_path):
    """Idle pool workers waited for work for ever once their parent was SIGKILLed (each holds the task pipe
    open, so none sees it close)."""
    marker = tmp_path / "marker"
    killed = subprocess.run([sys.executable, "-c", _KILLED_PARENT, str(marker)], env=cli_env(), check=False)
    assert killed.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while _processes_naming(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _processes_naming(marker)
    for pid in left:  # do not leave them behind even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, "worker processes outlived their parent"


def _processes_naming(path: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(path).encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            pass
    return found
