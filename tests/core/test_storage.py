"""habla.core.storage: atomic writes and conditional creates, on local folders and a real S3 server."""

from __future__ import annotations

import os

import pytest

from habla.core import storage


def test_local_writes_are_atomic(tmp_path):
    target = tmp_path / "a" / "file.bin"
    storage.write_bytes(str(target), b"one")
    with pytest.raises(RuntimeError), storage.AtomicWriter(str(target)) as w:
        w.write(b"two, half-way")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"one"
    assert os.listdir(target.parent) == ["file.bin"], "no temporary file left behind"
    with storage.AtomicWriter(str(target)) as w:
        w.write(b"two")
    assert target.read_bytes() == b"two"


def test_conditional_create_local(tmp_path):
    uri = str(tmp_path / "claim")
    assert storage.create_exclusive(uri, b"first") is True
    assert storage.create_exclusive(uri, b"second") is False
    assert storage.read_bytes(uri) == b"first"


def test_s3_multipart_writer_publishes_whole_or_nothing(s3_bucket):
    uri = f"{s3_bucket}/big.tar"
    data = os.urandom(12 * 1024 * 1024)
    with storage.AtomicWriter(uri, part_size=5 * 1024 * 1024) as w:
        for i in range(0, len(data), 1_000_000):
            w.write(data[i : i + 1_000_000])
            assert not storage.exists(uri), "nothing is visible before the writer commits"
    assert storage.read_bytes(uri) == data

    failed = f"{s3_bucket}/failed.tar"
    with pytest.raises(RuntimeError), storage.AtomicWriter(failed, part_size=5 * 1024 * 1024) as w:
        w.write(data)
        raise RuntimeError("killed")
    assert not storage.exists(failed)
    bucket, _ = storage.split_s3(s3_bucket)
    assert not storage.s3_client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_s3_small_write_and_conditional_create(s3_bucket):
    with storage.AtomicWriter(f"{s3_bucket}/small") as w:
        w.write(b"tiny")
    assert storage.read_bytes(f"{s3_bucket}/small") == b"tiny"
    assert storage.create_exclusive(f"{s3_bucket}/claim", b"a") is True
    assert storage.create_exclusive(f"{s3_bucket}/claim", b"b") is False
    assert [o.uri for o in storage.list_files(s3_bucket)] == [f"{s3_bucket}/claim", f"{s3_bucket}/small"]
