"""Fixtures of the training/evaluation tests, loaded by their modules with ``pytest_plugins`` (the lead owns
tests/conftest.py).

Test data comes from the bundled real-speech release ``data/mini-es-v25/es``, prepared by ``habla prepare``
(the manifests users train on).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import RELEASE, write_manifest

from habla.prepare import PrepareOptions, prepare


@pytest.fixture(scope="session")
def train_clips(tmp_path_factory) -> list[dict]:
    """Manifest entries of the bundled release's train split, as habla prepare writes them, shortest first."""
    out = tmp_path_factory.mktemp("mini-es-prepared")
    prepare(str(RELEASE), str(out), PrepareOptions(shards=1, splits=("train",)), workers=2)
    entries = [json.loads(line) for line in (out / "manifests" / "train.json").read_text().splitlines()]
    return sorted(entries, key=lambda e: (e["duration"], e["path"]))


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
