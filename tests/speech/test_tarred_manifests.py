"""Manifests in NeMo's tarred form (``habla prepare --format tar``: dev and test too) read for validation and
evaluation: each tar read once, its members extracted into the cache; tars are untrusted like any data."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from fixtures.releases import real_clips

from habla.core import storage
from habla.core.errors import HablaError
from habla.speech import manifests


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def entry(name: str, shard: int, line: int = 1) -> dict:
    return {"audio_filepath": name, "shard_id": shard, "duration": 1.0, "text": "hola", "_line": line}


@pytest.fixture
def two_tars(tmp_path) -> tuple[str, dict[str, bytes]]:
    """Two tar shards of real clips' bytes: (their pattern, every member's bytes)."""
    clips = {f"clip_{k}.mp3": path.read_bytes() for k, path in enumerate(real_clips(4))}
    names = sorted(clips)
    write_tar(tmp_path / "audio_0.tar", {n: clips[n] for n in names[:2]})
    write_tar(tmp_path / "audio_1.tar", {n: clips[n] for n in names[2:]})
    return str(tmp_path / "audio__OP_0..1_CL_.tar"), clips


def test_members_are_extracted_once_and_found_by_shard_and_name(tmp_path, two_tars):
    pattern, clips = two_tars
    names = sorted(clips)
    entries = [entry(names[3], 1, 1), entry(names[0], 0, 2), entry(names[0], 0, 3)]
    local = manifests.localize(entries, str(tmp_path / "test.json"), cache=tmp_path / "cache", tars=pattern)
    assert [Path(e["audio_filepath"]).read_bytes() for e in local] == [clips[names[3]], clips[names[0]],
                                                                        clips[names[0]]]  # fmt: skip
    assert [e["_line"] for e in local] == [1, 2, 3] and entries[0]["audio_filepath"] == names[3]  # not mutated
    # Read again: nothing is extracted again (the cached copy is what is returned)
    first = Path(local[0]["audio_filepath"])
    first.write_bytes(b"cached")
    again = manifests.localize(entries, str(tmp_path / "test.json"), cache=tmp_path / "cache", tars=pattern)
    assert Path(again[0]["audio_filepath"]).read_bytes() == b"cached"
    # A tar that changes (another size or mtime) is extracted again, into another folder
    write_tar(tmp_path / "audio_1.tar", {names[3]: b"new"})
    renewed = manifests.localize(entries, str(tmp_path / "test.json"), cache=tmp_path / "cache", tars=pattern)
    assert Path(renewed[0]["audio_filepath"]).read_bytes() == b"new"


def test_tarred_entries_without_their_tars_are_one_line(tmp_path):
    with pytest.raises(HablaError, match=r"test.json: line 4 names a member of tar shard 0 \(shard_id\): give the"):
        manifests.localize([entry("a.wav", 0, 4)], str(tmp_path / "test.json"), cache=tmp_path / "cache")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (entry("clip_0.mp3", 2), r"line 1: shard_id 2 is not one of the 2 tar shard\(s\)"),
        (entry("clip_0.mp3", True), r"line 1: shard_id True is not one of"),
        (entry("clip_0.mp3", "0"), r"line 1: shard_id '0' is not one of"),
        (entry("clip_3.mp3", 0), r"line 1: clip_3.mp3 is not a file in .*audio_0.tar"),
        (entry("../../etc/passwd", 0), r"line 1: tar member '../../etc/passwd' is not a plain file name"),
    ],
)
def test_a_wrong_shard_or_member_is_one_line(tmp_path, two_tars, bad, message):
    with pytest.raises(HablaError, match=message):
        manifests.localize([bad], str(tmp_path / "test.json"), cache=tmp_path / "cache", tars=two_tars[0])


def test_hostile_members_are_never_written_outside_the_cache(tmp_path):
    """A tar is data: members that are links, devices, folders, escaping or hidden names, or too large are not
    extracted; only the regular, plainly named one is."""
    tar_path = tmp_path / "audio_0.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind in (("../escape.wav", tarfile.REGTYPE), (".hidden.wav", tarfile.REGTYPE),
                           ("link.wav", tarfile.SYMTYPE), ("dev.wav", tarfile.CHRTYPE), ("dir.wav", tarfile.DIRTYPE),
                           ("sub/inner.wav", tarfile.REGTYPE)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            data = b"x" if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("big.wav")
        info.size = manifests.MAX_MEMBER_BYTES + 1
        tar.addfile(info, io.BytesIO(bytes(info.size)))
        info = tarfile.TarInfo("good.wav")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"RIFF"))
    local = manifests.localize([entry("good.wav", 0)], "m.json", cache=tmp_path / "cache", tars=str(tar_path))
    assert Path(local[0]["audio_filepath"]).read_bytes() == b"RIFF"
    written = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert written == [".complete", "good.wav"] and not (tmp_path / "escape.wav").exists()
    for name in ("link.wav", "dev.wav", "dir.wav", "big.wav"):
        with pytest.raises(HablaError, match=f"{name} is not a file in"):
            manifests.localize([entry(name, 0)], "m.json", cache=tmp_path / "cache", tars=str(tar_path))


def test_a_missing_or_broken_tar_is_one_line(tmp_path):
    with pytest.raises(HablaError, match=r"audio_0.tar: tar shard not found"):
        manifests.localize([entry("a.wav", 0)], "m.json", cache=tmp_path / "cache", tars=str(tmp_path / "audio_0.tar"))
    (tmp_path / "audio_0.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(HablaError, match=r"audio_0.tar: not a readable tar shard"):
        manifests.localize([entry("a.wav", 0)], "m.json", cache=tmp_path / "cache", tars=str(tmp_path / "audio_0.tar"))


def test_tars_in_object_storage_are_read_with_one_get_each(s3_bucket, tmp_path, two_tars):
    pattern, clips = two_tars
    for k in range(2):
        storage.upload_file(tmp_path / f"audio_{k}.tar", f"{s3_bucket}/d/audio_{k}.tar")
    names = sorted(clips)
    entries = [entry(name, k // 2, k + 1) for k, name in enumerate(names)]
    # beside them, a line of a plain manifest: an object of its own, relative to the manifest
    storage.write_bytes(f"{s3_bucket}/d/loose.mp3", clips[names[0]])
    entries.append({"audio_filepath": "loose.mp3", "duration": 1.0, "text": "hola", "_line": 5})
    requests: list[str] = []
    client = storage.s3_client()
    client.meta.events.register("before-send.s3", lambda request, **_: requests.append(request.method))
    local = manifests.localize(entries, f"{s3_bucket}/d/test.json", cache=tmp_path / "cache",
                               tars=f"{s3_bucket}/d/audio__OP_0..1_CL_.tar")  # fmt: skip
    assert [Path(e["audio_filepath"]).read_bytes() for e in local] == [clips[n] for n in [*names, names[0]]]
    assert Path(local[-1]["audio_filepath"]).is_relative_to(tmp_path / "cache" / "audio")
    # a stamp and a read per tar; the loose object's download (boto3's download_file: a HEAD, a GET)
    assert sorted(requests) == ["GET", "GET", "GET", "HEAD", "HEAD", "HEAD"], json.dumps(requests)
