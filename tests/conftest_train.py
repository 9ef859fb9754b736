"""Fixtures and helpers of the training/evaluation tests (imported by those test files: the lead owns conftest.py).

Test data comes from the bundled real-speech release ``data/mini-es-v25/es``: its train rows whose
sentence ``habla.text.normalize_text`` accepts, converted to 16 kHz WAV with ``habla.audio.convert`` and
listed in a manifest in the docs/layout.md format. (``habla prepare`` does this for real; these fixtures
keep the training tests independent of it.)
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from habla.audio import convert
from habla.commonvoice import TsvRow, read_durations, read_tsv
from habla.text import TextRejected, normalize_text

REPO = Path(__file__).resolve().parents[1]
RELEASE = REPO / "data" / "mini-es-v25" / "es"
BIN = Path(sys.executable).parent
HABLA = str(BIN / "habla")
TORCHRUN = str(BIN / "torchrun")
MOTO_SERVER = str(BIN / "moto_server")


def write_manifest(entries: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def train_clips(tmp_path_factory) -> list[dict]:
    """Manifest entries (WAV written) of every usable train clip of the bundled release, shortest first."""
    out = tmp_path_factory.mktemp("mini-es-wav")
    durations = read_durations(str(RELEASE))
    _, rows = read_tsv(str(RELEASE / "train.tsv"))
    entries, seen = [], set()
    for row in rows:
        if not isinstance(row, TsvRow) or row.fields["path"] in seen:
            continue
        try:
            text = normalize_text(row.fields["sentence"])
        except TextRejected:
            continue
        seen.add(row.fields["path"])
        converted = convert((RELEASE / "clips" / row.fields["path"]).read_bytes())
        wav = out / row.fields["path"].replace(".mp3", ".wav")
        wav.write_bytes(converted.wav)
        entries.append({
            "audio_filepath": str(wav), "duration": round(converted.duration, 3), "text": text,
            "sentence": row.fields["sentence"], "path": row.fields["path"], "client_id": row.fields["client_id"],
            **{k: row.fields.get(k, "") for k in ("gender", "age", "accents", "locale")},
        })  # fmt: skip
    entries.sort(key=lambda e: (durations.get(e["path"], e["duration"]), e["path"]))
    return entries


@pytest.fixture(scope="session")
def clips30(train_clips, tmp_path_factory) -> Path:
    """Manifest of the 30 shortest usable clips (sorted by path, as habla prepare writes them)."""
    chosen = sorted(train_clips[:30], key=lambda e: e["path"])
    return write_manifest(chosen, tmp_path_factory.mktemp("clips30") / "train30.json")


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP threads spin against each other (10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private HABLA_CACHE (downloaded audio, local checkpoint folders of s3:// runs)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("HABLA_CACHE", str(path))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    """Environment of a ``habla`` subprocess: this checkout first on the path, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_habla(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([HABLA, *args], capture_output=True, text=True, env=env or cli_env(), timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------- S3


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """moto's standalone S3 server on a loopback port (a real HTTP endpoint, not the in-process mock)."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    """Point boto3 (habla.storage, Lhotse/smart_open) at the moto server; returns a fresh bucket's URI."""
    from habla import storage

    for key, value in {
        "AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    storage._client_for_pid.cache_clear()
    bucket = f"habla-{time.monotonic_ns()}"
    storage.s3_client().create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
    storage._client_for_pid.cache_clear()


def upload_wav_manifest(entries: list[dict], prefix: str, name: str) -> str:
    """Upload the WAVs and a manifest whose audio_filepath values are s3:// URIs. Returns the manifest URI."""
    from habla import storage

    remote = []
    for entry in entries:
        uri = storage.join(prefix, "audio", Path(entry["audio_filepath"]).name)
        storage.upload_file(entry["audio_filepath"], uri)
        remote.append({**entry, "audio_filepath": uri})
    uri = storage.join(prefix, "manifests", name)
    storage.write_text(uri, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in remote))
    return uri


def upload_tar_shards(entries: list[dict], prefix: str, shards: int) -> tuple[str, str]:
    """NeMo tarred shards as docs/layout.md describes them: ``audio_<k>.tar`` (members ``<clip>.wav``) and
    ``manifest_<k>.json`` (audio_filepath = member name, shard_id = k). Returns the (manifest, tar) patterns."""
    from habla import storage

    for k in range(shards):
        members = entries[k::shards]
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for entry in members:
                tar.add(entry["audio_filepath"], arcname=Path(entry["audio_filepath"]).name)
        storage.write_bytes(storage.join(prefix, f"audio_{k}.tar"), buffer.getvalue())
        lines = [{**e, "audio_filepath": Path(e["audio_filepath"]).name, "shard_id": k} for e in members]
        storage.write_text(storage.join(prefix, f"manifest_{k}.json"),
                           "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in lines))  # fmt: skip
    last = shards - 1
    return (storage.join(prefix, f"manifest__OP_0..{last}_CL_.json"), storage.join(prefix, f"audio__OP_0..{last}_CL_.tar"))


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
