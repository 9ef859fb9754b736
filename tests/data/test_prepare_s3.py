"""habla prepare against a real S3 server (moto's standalone server over HTTP on loopback)."""

from __future__ import annotations

import json
import tarfile
import time

from fixtures.commands import read_jsonl, run_habla
from fixtures.releases import MINI_V8, real_clips, tsv_row, write_release
from fixtures.s3 import SLOW_READ_S, upload_tree

from habla.core import jsonl, storage
from habla.data import prepare as prep
from habla.data.options import PrepareOptions


def read_manifest(uri: str) -> list[dict]:
    return jsonl.loads(storage.read_text(uri))


def local_reference(tmp_path, **options) -> dict[str, list[dict]]:
    out = tmp_path / "local"
    prep.prepare(str(MINI_V8), str(out), PrepareOptions(**options), workers=2)
    return {s: read_jsonl(out / "manifests" / f"{s}.json") for s in ("train", "dev", "test")}


def without_location(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "audio_filepath"} for e in entries]


def test_release_and_output_in_object_storage(s3_bucket, tmp_path):
    release = f"{s3_bucket}/cv-corpus-8.0-2022-01-19/es"
    upload_tree(MINI_V8, release)
    out = f"{s3_bucket}/runs/one/data"
    result = run_habla("prepare", "--release", release, "--out", out, "--shards", "2", "--workers", "2")
    assert result.returncode == 0, result.stderr
    reference = local_reference(tmp_path, shards=2)
    for split in ("train", "dev", "test"):
        entries = read_manifest(f"{out}/manifests/{split}.json")
        assert without_location(entries) == without_location(reference[split])
        assert all(e["audio_filepath"].startswith(f"{out}/audio/{split}/") for e in entries)
        wav = storage.read_bytes(entries[0]["audio_filepath"])
        assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    report = json.loads(storage.read_text(f"{out}/report.json"))
    assert report["release"] == "cv-corpus-8.0-2022-01-19-es"
    assert report["accounting"]["rows_read"] == report["accounting"]["in_manifests"] + report["accounting"]["rejected"]


def test_tar_shards_in_object_storage(s3_bucket, tmp_path):
    release = f"{s3_bucket}/rel/es"
    upload_tree(MINI_V8, release)
    out = f"{s3_bucket}/runs/tar/data"
    report = prep.prepare(release, out, PrepareOptions(shards=2, format="tar"), workers=2)
    assert report["tarred"]["train"]["tarred_audio_filepaths"] == f"{out}/tarred/train/audio__OP_0..1_CL_.tar"
    local = tmp_path / "audio_0.tar"
    storage.download_file(f"{out}/tarred/train/audio_0.tar", local)
    with tarfile.open(local) as tar:
        names = tar.getnames()
    assert [e["audio_filepath"] for e in read_manifest(f"{out}/tarred/train/manifest_0.json")] == names


def test_a_tar_shard_writes_a_few_objects_however_many_clips_it_holds(s3_bucket, tmp_path):
    """--format tar into object storage: dev and test are tars too, so a conversion shard's writes do not grow
    with its clips (a WAV per dev/test clip was one PUT each)."""
    names = [f"common_voice_es_{k:03d}.mp3" for k in range(90)]
    clips = real_clips(16)
    rows = {split: [tsv_row(n, client_id=f"{split}{k % 7}") for k, n in enumerate(names[30 * i : 30 * (i + 1)])]
            for i, split in enumerate(("train", "dev", "test"))}  # fmt: skip
    release = write_release(tmp_path / "rel" / "es", rows, {n: clips[k % 16] for k, n in enumerate(names)})
    out = f"{s3_bucket}/few/data"
    prep.plan(str(release), out, PrepareOptions(shards=1, format="tar"))
    requests: list[str] = []
    storage.s3_client().meta.events.register("before-send.s3", lambda request, **_: requests.append(request.method))
    result = prep.convert_shard(out, 0, workers=1)
    assert result["splits"] == {"train": 30, "dev": 30, "test": 30}
    # the started marker; per split a tar, its manifest and the shard's manifest lines; the rejections; the result
    assert requests.count("PUT") == 1 + 3 * 3 + 1 + 1, requests
    report = prep.assemble(out)
    assert {s: report["tarred"][s]["num_shards"] for s in ("train", "dev", "test")} == {"train": 1, "dev": 1, "test": 1}


def test_transient_s3_failures_are_retried_and_lose_nothing(flaky_s3, tmp_path):
    bucket, proxy = flaky_s3
    release = f"{bucket}/rel/es"
    upload_tree(MINI_V8, release)
    out = f"{bucket}/runs/flaky/data"
    result = run_habla("prepare", "--release", release, "--out", out, "--shards", "2", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert proxy.failed >= 20, "the proxy must actually have failed requests"
    reference = local_reference(tmp_path, shards=2)
    for split in ("train", "dev", "test"):
        assert without_location(read_manifest(f"{out}/manifests/{split}.json")) == without_location(reference[split])
    audio = [o for o in storage.list_files(f"{out}/audio")]
    assert len(audio) == sum(len(reference[s]) for s in reference)


def test_unreachable_bucket_is_one_line(s3_bucket, tmp_path):
    result = run_habla("prepare", "--out", "s3://no-such-bucket-here/x")
    assert result.returncode == 2
    assert "cannot reach bucket s3://no-such-bucket-here" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_endpoint_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    result = run_habla("prepare", "--out", "s3://bucket/x", timeout=120)
    assert result.returncode == 1 and "cannot reach bucket" in result.stderr  # a fault: exit 1, run again
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_extracted_release_prefix_is_read_concurrently(distant_seaweedfs, tmp_path):
    """A release uploaded clip by clip to a real SeaweedFS whose every clip GET takes SLOW_READ_S (a store in
    another zone): one worker keeps many reads in flight, so 64 clips take a few latencies (and their decoding),
    not 64 latencies one after another."""
    bucket, proxy = distant_seaweedfs
    names = [f"common_voice_es_{k:03d}.mp3" for k in range(64)]
    clips = real_clips(16)
    local = write_release(tmp_path / "rel" / "es", {"train": [tsv_row(n, client_id=f"s{k % 5}") for k, n in
                          enumerate(names)]}, {n: clips[k % 16] for k, n in enumerate(names)})  # fmt: skip
    upload_tree(local, f"{bucket}/cv/es")
    out = str(tmp_path / "out")
    prep.plan(f"{bucket}/cv/es", out, PrepareOptions(splits=("train",), shards=1))
    started = time.monotonic()
    result = prep.convert_shard(out, 0, workers=1)
    took = time.monotonic() - started
    assert result["splits"] == {"train": 64}
    assert proxy.reading_peak >= 16, f"at most {proxy.reading_peak} clip reads in flight"
    assert took < len(names) * SLOW_READ_S / 2, f"{took:.1f} s for 64 clips at {SLOW_READ_S} s a read"
