"""habla.core.storage: atomic writes and conditional creates, on local folders and a real S3 server."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

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


# --------------------------------------------------------------------------- modes, names, untrusted files

_WRITE_EVERY_WAY = r"""
import sys
from pathlib import Path
from habla.core import storage
root = Path(sys.argv[1])
storage.write_bytes(str(root / "a" / "written"), b"x")
with storage.AtomicWriter(str(root / "a" / "streamed")) as w:
    w.write(b"x")
storage.create_exclusive(str(root / "a" / "claimed"), b"x")
storage.upload_file(root / "a" / "written", str(root / "b" / "uploaded"))
storage.download_file(str(root / "a" / "written"), root / "b" / "downloaded")
"""


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    """mkstemp made every output 0600: pods running as another user could not read manifests or audio."""
    subprocess.run([sys.executable, "-c", _WRITE_EVERY_WAY, str(tmp_path)], check=True, umask=umask)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert [p.name for p in files] == ["claimed", "streamed", "written", "downloaded", "uploaded"]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == dict.fromkeys((p.name for p in files), mode)


def test_temporary_names_stay_within_the_file_name_limit(tmp_path):
    """A 250-byte name is a valid file name; its temporary name must be one too (it was 265 bytes)."""
    for name in ("a" * 251 + ".wav", "é" * 125 + ".wav"):
        storage.write_bytes(str(tmp_path / name), b"x")
        with storage.AtomicWriter(str(tmp_path / ("t" + name[1:]))) as w:
            w.write(b"y")
    assert len(os.listdir(tmp_path)) == 4 and not list(tmp_path.glob(".*"))


def test_read_capped_refuses_what_is_not_a_regular_file(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero.mp3")
    os.mkfifo(tmp_path / "fifo.mp3")  # nobody writes to it: a plain open() would block for ever
    os.symlink(tmp_path / "loop.mp3", tmp_path / "loop.mp3")
    (tmp_path / "folder.mp3").mkdir()
    expected = {"zero.mp3": "character device", "fifo.mp3": "FIFO", "loop.mp3": "link loop", "folder.mp3": "folder"}
    for name, kind in expected.items():
        with pytest.raises(storage.NotAFile, match=kind):
            storage.read_capped(str(tmp_path / name), 1000)
    (tmp_path / "big.mp3").write_bytes(b"x" * 1001)
    with pytest.raises(storage.TooLarge):
        storage.read_capped(str(tmp_path / "big.mp3"), 1000)
    os.symlink(tmp_path / "big.mp3", tmp_path / "link.mp3")  # a symlink to a regular file is read
    assert storage.read_capped(str(tmp_path / "link.mp3"), 1001) == b"x" * 1001
    with pytest.raises(FileNotFoundError):
        storage.read_capped(str(tmp_path / "absent.mp3"), 1000)


def test_read_capped_on_s3(s3_bucket):
    storage.write_bytes(f"{s3_bucket}/big", b"x" * 1001)
    storage.write_bytes(f"{s3_bucket}/empty", b"")
    with pytest.raises(storage.TooLarge):
        storage.read_capped(f"{s3_bucket}/big", 1000)
    assert storage.read_capped(f"{s3_bucket}/big", 1001) == b"x" * 1001
    assert storage.read_capped(f"{s3_bucket}/empty", 1000) == b""
    with pytest.raises(FileNotFoundError):
        storage.read_capped(f"{s3_bucket}/absent", 1000)


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = storage._host_tag()
    (tmp_path / "audio").mkdir()
    killed = tmp_path / "audio" / f".x.wav.{host}-{dead.pid}-0.part"
    live = tmp_path / "audio" / f".y.wav.{host}-{os.getpid()}-0.part"
    elsewhere = tmp_path / f".z.wav.{'0' * 8 if host != '0' * 8 else '1' * 8}-{dead.pid}-0.part"
    for path in (killed, live, elsewhere):
        path.write_bytes(b"half")
    assert storage.remove_stale_parts(str(tmp_path)) == 1
    assert not killed.exists() and live.exists() and elsewhere.exists(), "another machine's writer may be alive"
    old = time.time() - storage.STALE_PART_SECONDS - 60
    os.utime(elsewhere, (old, old))
    assert storage.remove_stale_parts(str(tmp_path)) == 1 and not elsewhere.exists() and live.exists()
