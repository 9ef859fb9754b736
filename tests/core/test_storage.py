"""habla.core.storage: atomic writes and conditional creates, on local folders and a real S3 server."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from habla.core import conditional, leftovers, storage, untrusted


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
    assert conditional.create_exclusive(uri, b"first") is True
    assert conditional.create_exclusive(uri, b"second") is False
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
    assert conditional.create_exclusive(f"{s3_bucket}/claim", b"a") is True
    assert conditional.create_exclusive(f"{s3_bucket}/claim", b"b") is False
    assert [o.uri for o in storage.list_files(s3_bucket)] == [f"{s3_bucket}/claim", f"{s3_bucket}/small"]


# --------------------------------------------------------------------------- modes, names, untrusted files

_WRITE_EVERY_WAY = r"""
import sys
from pathlib import Path
from habla.core import conditional, storage
root = Path(sys.argv[1])
storage.write_bytes(str(root / "a" / "written"), b"x")
with storage.AtomicWriter(str(root / "a" / "streamed")) as w:
    w.write(b"x")
conditional.create_exclusive(str(root / "a" / "claimed"), b"x")
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
        with pytest.raises(untrusted.NotAFile, match=kind):
            untrusted.read_capped(str(tmp_path / name), 1000)
    (tmp_path / "big.mp3").write_bytes(b"x" * 1001)
    with pytest.raises(untrusted.TooLarge):
        untrusted.read_capped(str(tmp_path / "big.mp3"), 1000)
    os.symlink(tmp_path / "big.mp3", tmp_path / "link.mp3")  # a symlink to a regular file is read
    assert untrusted.read_capped(str(tmp_path / "link.mp3"), 1001) == b"x" * 1001
    with pytest.raises(FileNotFoundError):
        untrusted.read_capped(str(tmp_path / "absent.mp3"), 1000)


def test_read_capped_on_s3(s3_bucket):
    storage.write_bytes(f"{s3_bucket}/big", b"x" * 1001)
    storage.write_bytes(f"{s3_bucket}/empty", b"")
    with pytest.raises(untrusted.TooLarge):
        untrusted.read_capped(f"{s3_bucket}/big", 1000)
    assert untrusted.read_capped(f"{s3_bucket}/big", 1001) == b"x" * 1001
    assert untrusted.read_capped(f"{s3_bucket}/empty", 1000) == b""
    with pytest.raises(FileNotFoundError):
        untrusted.read_capped(f"{s3_bucket}/absent", 1000)


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = storage.host_tag()
    (tmp_path / "audio").mkdir()
    killed = tmp_path / "audio" / f".x.wav.{host}-{dead.pid}-0.part"
    live = tmp_path / "audio" / f".y.wav.{host}-{os.getpid()}-0.part"
    elsewhere = tmp_path / f".z.wav.{'0' * 8 if host != '0' * 8 else '1' * 8}-{dead.pid}-0.part"
    for path in (killed, live, elsewhere):
        path.write_bytes(b"half")
    assert leftovers.remove_stale_parts(str(tmp_path)) == 1
    assert not killed.exists() and live.exists() and elsewhere.exists(), "another machine's writer may be alive"
    old = time.time() - storage.STALE_PART_SECONDS - 60
    os.utime(elsewhere, (old, old))
    data = tmp_path / "staging" / "clips" / "x.part"  # somebody's file, however old: not ours to delete
    data.parent.mkdir(parents=True)
    data.write_bytes(b"audio")
    os.utime(data, (old, old))
    assert leftovers.remove_stale_parts(str(tmp_path)) == 1 and not elsewhere.exists() and live.exists()
    assert data.exists()


# ------------------------------------------------------------------------- compare-and-swap and the probe


@pytest.mark.parametrize("where", ["local", "s3"])
def test_compare_and_swap_refuses_a_stale_version(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    uri = storage.join(root, "models", "best.json")
    assert conditional.read_versioned(uri) is None
    assert conditional.write_if_match(uri, b"one", None) is True
    assert conditional.write_if_match(uri, b"two", None) is False, "None means: only if nothing is there"
    first = conditional.read_versioned(uri)
    assert first.data == b"one"
    assert conditional.write_if_match(uri, b"two", first.etag) is True
    assert conditional.write_if_match(uri, b"three", first.etag) is False, "a stale version is refused"
    assert conditional.read_versioned(uri).data == b"two"


def test_local_compare_and_swap_loses_no_update_between_threads(tmp_path):
    """Eight threads add one to a counter by read / compare-and-swap / retry: every increment survives."""
    import threading

    uri = str(tmp_path / "counter")
    storage.write_bytes(uri, b"0")
    start = threading.Barrier(8)

    def add_one() -> None:
        start.wait()
        while True:
            current = conditional.read_versioned(uri)
            if conditional.write_if_match(uri, str(int(current.data) + 1).encode(), current.etag):
                return

    threads = [threading.Thread(target=add_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert storage.read_bytes(uri) == b"8"


def test_the_probe_passes_a_store_that_enforces_conditional_writes_and_caches_the_result(s3_bucket, tmp_path):
    probe = conditional.probe_conditional_writes(f"{s3_bucket}/state")
    assert probe.ok and "412" in probe.detail, probe
    assert list(storage.list_files(s3_bucket)) == [], "the probe key is deleted"
    assert conditional.probe_conditional_writes(f"{s3_bucket}/other-prefix") is probe, "cached per endpoint and bucket"
    assert conditional.probe_conditional_writes(f"{s3_bucket}/state", ttl=0) is not probe, "and only for the TTL"
    local = conditional.probe_conditional_writes(str(tmp_path))
    assert local.ok and "link(2)" in local.detail


def test_the_probe_catches_a_store_that_ignores_conditional_headers(lax_s3):
    bucket, proxy = lax_s3
    probe = conditional.probe_conditional_writes(f"{bucket}/state")
    assert not probe.conditional_create and not probe.compare_and_swap
    assert probe.detail == "two concurrent PUTs with If-None-Match: * both answered 200 OK"
    assert proxy.dropped >= 2 and probe.store.startswith(f"{bucket} at http://127.0.0.1:")
    # Without the probe, a conditional create on this store silently overwrites.
    assert conditional.create_exclusive(f"{bucket}/k", b"a") and conditional.create_exclusive(f"{bucket}/k", b"b")


def test_the_probe_fails_a_store_that_refuses_conditional_headers(moto_server, monkeypatch):
    import threading

    from fixtures.s3 import new_bucket, use_endpoint
    from standins.s3_proxy import FlakyProxy

    use_endpoint(monkeypatch, moto_server)
    bucket = new_bucket()
    proxy = FlakyProxy(moto_server, fail_before=0, fail_after=0, refuse_conditions=True)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        use_endpoint(monkeypatch, proxy.url)
        probe = conditional.probe_conditional_writes(f"s3://{bucket}/state")
        assert not probe.ok and probe.detail == "a PUT with If-None-Match: * answered 501 NotImplemented"
    finally:
        proxy.shutdown()
        storage._client_for_pid.cache_clear()


def test_the_probe_reports_a_store_it_cannot_reach_in_one_line(moto_server, monkeypatch):
    from fixtures.commands import free_port
    from fixtures.s3 import use_endpoint

    from habla.core.errors import HablaError

    use_endpoint(monkeypatch, f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage._client_for_pid.cache_clear()
    with pytest.raises(HablaError, match=r"^cannot check conditional writes on s3://nowhere: ") as err:
        conditional.probe_conditional_writes("s3://nowhere/state")
    assert "\n" not in str(err.value)
    storage._client_for_pid.cache_clear()


def test_seaweedfs_as_kfp_ships_it_enforces_conditional_writes_under_races(seaweedfs_bucket):
    """The real SeaweedFS (KFP 2.17's pin, 4.34): the probe passes, and where seaweedfs#8800 saw three
    concurrent If-None-Match PUTs all answer 200 (4.16), eight racing creates of each of 20 keys have exactly
    one winner, whose body the key keeps; eight threads adding to a counter by If-Match lose no update."""
    import threading

    probe = conditional.probe_conditional_writes(f"{seaweedfs_bucket}/state")
    assert probe.ok, probe
    for k in range(20):
        uri = f"{seaweedfs_bucket}/race/{k}"
        start, winners = threading.Barrier(8), []

        def create(i: int, uri=uri, start=start, winners=winners) -> None:
            start.wait(timeout=30)
            if conditional.create_exclusive(uri, f"writer {i}".encode()):
                winners.append(i)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(winners) == 1 and storage.read_bytes(uri) == f"writer {winners[0]}".encode(), (k, winners)

    counter = f"{seaweedfs_bucket}/counter"
    storage.write_bytes(counter, b"0")
    start = threading.Barrier(8)

    def add_three() -> None:
        start.wait(timeout=30)
        for _ in range(3):
            while True:
                current = conditional.read_versioned(counter)
                if conditional.write_if_match(counter, str(int(current.data) + 1).encode(), current.etag):
                    break

    threads = [threading.Thread(target=add_three) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert storage.read_bytes(counter) == b"24"
