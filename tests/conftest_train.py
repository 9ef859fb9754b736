"""Fixtures of the training/evaluation tests, loaded by their modules with ``pytest_plugins`` (the lead owns
tests/conftest.py).

Test data comes from the bundled real-speech release ``data/mini-es-v25/es``: its train rows whose
sentence ``habla.text.normalize_text`` accepts, converted to 16 kHz WAV with ``habla.audio.convert`` and
listed in a manifest in the docs/layout.md format. (``habla prepare`` does this for real; these fixtures
keep the training tests independent of it.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import RELEASE, write_manifest

from habla.audio import convert
from habla.commonvoice import TsvRow, read_durations, read_tsv
from habla.text import TextRejected, normalize_text


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


@pytest.fixture
def s3(s3_bucket):
    """A fresh bucket on conftest's loopback S3 server (habla.storage, Lhotse/smart_open point at it)."""
    return s3_bucket
