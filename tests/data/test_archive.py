"""A release archive read once into staged tables and per-shard bundles (habla.data.archive, habla.data.bundles):
what the archive must be, what is written (and what is not), and a pass that resumes."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import subprocess
import sys
import tarfile

import pytest
from fixtures.releases import MINI, real_clips, tar_bytes, tsv_row, write_release

from habla.core import state, storage
from habla.core.errors import HablaError
from habla.data import archive, bundles
from habla.data import prepare as prep
from habla.data.filters import build_plan
from habla.data.options import PrepareOptions

TSV = b"client_id\tpath\tsentence\na\t1.mp3\tuno\nb\t2.mp3\tdos\n"


def _members(tsv: bytes = TSV) -> list[tuple[str, bytes]]:
    return [("top/es/train.tsv", tsv), ("top/es/clips/1.mp3", b"m" * 700), ("top/es/clips/2.mp3", b"n" * 900),
            ("top/es/clips/3.mp3", b"o" * 500)]  # fmt: skip


OPTIONS = PrepareOptions(splits=("train",), shards=2)


def route(root: str) -> tuple[dict[str, int], int]:
    plan = build_plan(root, OPTIONS)
    return plan.routing(), len(plan.shards)


def stage(path, staging, max_clip_bytes: int = 10_000) -> archive.Staged:
    return archive.stage(str(path), str(staging), "es", "opts", max_clip_bytes, route)


def bundled(staging, shards: int = 2) -> dict[str, bytes | list]:
    """Every clip the bundles hold (name -> bytes), or why not (name -> [reason, detail])."""
    out: dict[str, bytes | list] = {}
    root = str(staging / "es")
    for k in range(shards):
        with bundles.open_shard(root, k, staging) as held:
            out.update({name: member.read() for name, member in held.members.items()})
            out.update(held.skipped)
    return out


def test_cut_archives_are_refused_and_the_failure_is_remembered(tmp_path):
    whole = tar_bytes(_members())
    for data in (whole[: whole.index(b"n" * 900) + 1024], whole[: whole.index(b"o" * 500) + 10]):
        for suffix, content in ((".tar", data), (".tar.gz", gzip.compress(data))):
            path = tmp_path / f"cut{suffix}"
            path.write_bytes(content)
            with pytest.raises(HablaError, match="incomplete archive|cannot read the archive"):
                stage(path, tmp_path / f"s{suffix}")
    path = tmp_path / "whole.tar"
    path.write_bytes(whole)
    done = stage(path, tmp_path / "s")
    assert done.root == str(tmp_path / "s" / "es") and done.clips == 3 and done.shards == 2
    assert bundled(tmp_path / "s") == {"1.mp3": b"m" * 700, "2.mp3": b"n" * 900}  # 3.mp3: no split lists it


def test_a_member_held_twice_is_refused_and_not_read_again(tmp_path):
    """tar lets the later copy of a member win silently: which audio is the release's cannot be told."""
    path = tmp_path / "cv.tar"
    path.write_bytes(tar_bytes([*_members(), ("top/es/clips/1.mp3", b"x" * 300)]))
    with pytest.raises(HablaError, match="holds top/es/clips/1.mp3 twice"):
        stage(path, tmp_path / "s")
    with pytest.raises(HablaError, match="holds top/es/clips/1.mp3 twice"):  # found once, said again unread
        archive.staged(str(path), str(tmp_path / "s"), "es", "other options")
    path.write_bytes(tar_bytes([*_members(), ("top/es/train.tsv", TSV)]))  # a table twice too
    with pytest.raises(HablaError, match="holds top/es/train.tsv twice"):
        stage(path, tmp_path / "s")


def test_a_staging_belongs_to_the_archive_content_and_the_options(tmp_path):
    path, staging = tmp_path / "cv.tar", tmp_path / "s"
    path.write_bytes(tar_bytes(_members()))
    first = stage(path, staging)
    assert stage(path, staging) == first  # unchanged: reused, not read again
    other = b"client_id\tpath\tsentence\nc\t3.mp3\ttres\n"
    path.write_bytes(tar_bytes(_members(other)))  # another archive at the same path
    second = stage(path, staging)
    assert second.index_sha256 != first.index_sha256
    assert b"tres" in (staging / "es" / "train.tsv").read_bytes()
    assert bundled(staging) == {"3.mp3": b"o" * 500}, "the older archive's bundles are gone"
    assert archive.staged(str(path), str(staging), "es", "other options") is None  # bundles follow the plan


def test_a_checksum_sidecar_is_verified_and_oversized_clips_are_not_bundled(tmp_path):
    path = tmp_path / "cv.tar.gz"
    tsv = TSV + b"c\thuge.mp3\tgrande\n"
    path.write_bytes(gzip.compress(tar_bytes([*_members(tsv), ("top/es/clips/huge.mp3", b"\0" * 50_000)])))
    (tmp_path / "cv.tar.gz.sha256").write_text("0" * 64 + "  cv.tar.gz\n")
    with pytest.raises(HablaError, match="SHA-256 differs"):
        stage(path, tmp_path / "s")
    (tmp_path / "cv.tar.gz.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "  cv.tar.gz\n")
    stage(path, tmp_path / "s")
    assert bundled(tmp_path / "s")["huge.mp3"] == ["too_large", "50000 bytes in the archive, more than 10000"]


def test_clips_listed_before_the_tables_take_a_second_read(tmp_path, caplog):
    """Common Voice lists the TSVs first; another packer may not: the clips are routed in a second read."""
    first, last = tmp_path / "tables-first.tar", tmp_path / "clips-first.tar"
    first.write_bytes(tar_bytes(_members()))
    last.write_bytes(tar_bytes(_members()[1:] + _members()[:1]))
    stage(first, tmp_path / "a")
    with caplog.at_level(logging.INFO, logger="habla.prepare"):
        stage(last, tmp_path / "b")
    assert [r.message for r in caplog.records].count(
        f"{last} lists tables after clips: reading it a second time to bundle the clips"
    ) == 1
    assert bundled(tmp_path / "a") == bundled(tmp_path / "b") == {"1.mp3": b"m" * 700, "2.mp3": b"n" * 900}


def test_an_interrupted_pass_writes_only_the_chunks_it_had_not_written(tmp_path, monkeypatch):
    clips = {f"{k:03d}.mp3": bytes([k]) * (1000 + k) for k in range(60)}
    tsv = b"client_id\tpath\tsentence\n" + b"".join(f"s\t{n}\thola\n".encode() for n in clips)
    path = tmp_path / "cv.tar"
    path.write_bytes(tar_bytes([("top/es/train.tsv", tsv), *((f"top/es/clips/{n}", d) for n, d in clips.items())]))
    monkeypatch.setattr(bundles, "CHUNK_BYTES", 5000)  # about 4 clips a chunk: 15 chunks over 2 shards
    written: list[str] = []
    kill = [True]
    real_write = storage.write_bytes

    def write(uri: str, data: bytes) -> None:
        if uri.endswith(".bin"):
            if len(written) == 6 and kill.pop() if kill else False:
                raise OSError("killed")
            written.append(uri)
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", write)
    with pytest.raises(OSError, match="killed"):
        stage(path, tmp_path / "s")
    before = set(written[:6])
    written.clear()
    stage(path, tmp_path / "s")
    assert before and not before & set(written), "chunks written whole before were written again"
    assert bundled(tmp_path / "s") == clips


def test_staging_a_large_member_takes_bounded_memory(tmp_path):
    """A 400 MB member was read whole (873 MB of RSS): members are streamed, and a clip over the cap skipped."""
    path = tmp_path / "cv.tar.gz"
    tsv = b"client_id\tpath\tsentence\na\tbig.mp3\thola\n" + b"#" * (120 * 2**20)
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in (("top/es/train.tsv", tsv), ("top/es/clips/big.mp3", None)):
            info = tarfile.TarInfo(name)
            info.size = len(data) if data is not None else 400 * 2**20
            tar.addfile(info, io.BytesIO(data) if data is not None else _Zeros(info.size))
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would count the forked pytest process
    code = (
        "import re, sys\n"
        "from habla.data import archive\n"
        "from habla.speech import audio\n"
        "route = lambda root: ({'big.mp3': 0}, 1)\n"
        "staged = archive.stage(sys.argv[1], sys.argv[2], 'es', 'x', audio.MAX_CLIP_BYTES, route)\n"
        "peak_kb = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "print(peak_kb // 1024, staged.clips)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "s")], capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    assert int(out[0]) < 200, f"peak RSS {out[0]} MB"
    assert out[1:] == ["1"]
    assert (tmp_path / "s" / "es" / "train.tsv").stat().st_size == len(tsv)
    index = json.loads((tmp_path / "s" / "es" / "bundles" / "shard-00000.json").read_text())
    assert list(index["skipped"]) == ["big.mp3"] and not index["clips"]


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n

    def readable(self) -> bool:
        return True


def _requests(client) -> list[str]:
    """Every request the S3 client sends from now on, as "METHOD key"."""
    sent: list[str] = []
    client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.method))
    return sent


@pytest.mark.parametrize("store", ["moto", "seaweedfs"])
def test_an_archive_to_object_storage_takes_requests_per_shard_not_per_clip(tmp_path, request, store):
    """600 clips, 150 of them listed: a few chunks per shard, none for the unlisted clips, nothing per clip."""
    bucket = request.getfixturevalue("s3_bucket" if store == "moto" else "seaweedfs_bucket")
    names = [f"common_voice_es_{k:05d}.mp3" for k in range(600)]
    real = [p.read_bytes() for p in real_clips(200, 0, 99)]
    clips = {n: real[k % len(real)] for k, n in enumerate(names)}
    listed = names[::4]
    tsv = "client_id\tpath\tsentence\n" + "".join(f"s{k % 7}\t{n}\thola que tal\n" for k, n in enumerate(listed))
    path = tmp_path / "cv-corpus-9.0-2022-04-27-es.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in [("cv/es/train.tsv", tsv.encode()), *((f"cv/es/clips/{n}", d) for n, d in clips.items())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sent = _requests(storage.s3_client())
    out = f"{bucket}/data"
    summary = prep.plan(str(path), out, PrepareOptions(splits=("train",), shards=3))
    puts = sent.count("PUT")
    assert summary["planned_clips"] == 150 and summary["clip_source"] == "bundles"
    assert puts < 40, f"{puts} PUTs for 600 clips in 3 shards"
    keys = [i.uri for i in storage.list_files(out)]
    assert not [k for k in keys if k.endswith(".mp3")], "clips uploaded one by one"
    assert state.read(f"{out}/staging/es/_STAGED.json")["clips"] == 600
    sent.clear()
    result = prep.convert_shard(out, 0, workers=1)
    assert sum(result["splits"].values()) + result["rejected"] == summary["shards"][0]["clips"]
    assert sent.count("GET") < 10 + summary["shards"][0]["clips"]  # the bundle in one GET; WAVs are PUT


def test_the_bundled_mini_release_converts_alike_from_its_archive(tmp_path):
    """Every clip an archive's shard reads comes from its bundle: the same manifests as from the folder."""
    path = tmp_path / "cv-corpus-25.0-2026-03-09-es.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(MINI, arcname="cv-corpus-25.0-2026-03-09/es")
    options = PrepareOptions(shards=3, format="tar")
    prep.prepare(str(path), str(tmp_path / "a"), options, workers=2)
    prep.prepare(str(MINI), str(tmp_path / "f"), options, workers=2)
    for name in ("manifests/train.json", "manifests/dev.json", "rejected.jsonl", "tarred/train/audio_0.tar"):
        a = (tmp_path / "a" / name).read_bytes().replace(str(tmp_path / "a").encode(), b"@")
        assert a == (tmp_path / "f" / name).read_bytes().replace(str(tmp_path / "f").encode(), b"@"), name


def test_a_missing_clip_and_a_clip_that_is_not_a_file(tmp_path):
    release = write_release(tmp_path / "rel", {"train": [tsv_row("a.mp3"), tsv_row("gone.mp3"), tsv_row("l.mp3")]},
                            {"a.mp3": real_clips(1)[0]})  # fmt: skip
    (release / "clips" / "l.mp3").symlink_to(release / "clips" / "a.mp3")
    path = tmp_path / "cv.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(release, arcname="top/es")
    prep.prepare(str(path), str(tmp_path / "out"), PrepareOptions(splits=("train",), shards=1), workers=1)
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert {r["path"]: r["reason"] for r in rejected} == {"gone.mp3": "missing_clip", "l.mp3": "missing_clip"}
