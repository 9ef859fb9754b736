"""Helpers of the training/evaluation tests: test data on disk and in S3, running the ``habla`` command."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RELEASE = REPO / "data" / "mini-es-v25" / "es"
BIN = Path(sys.executable).parent
HABLA = str(BIN / "habla")
TORCHRUN = str(BIN / "torchrun")


def write_manifest(entries: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def cli_env(**extra: str) -> dict[str, str]:
    """Environment of a ``habla`` subprocess: this checkout first on the path, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_habla(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HABLA, *args], capture_output=True, text=True, env=env or cli_env(), timeout=timeout, check=False
    )


# ------------------------------------------------------------------------------------------------- S3


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
    return (
        storage.join(prefix, f"manifest__OP_0..{last}_CL_.json"),
        storage.join(prefix, f"audio__OP_0..{last}_CL_.tar"),
    )
