"""habla watch under hostile inputs: archives still arriving, damaged state files (data-integrity issue #9)."""

from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile
from pathlib import Path

from test_watch import kfp  # noqa: F401 - the stand-in KFP server fixture

from habla.core import storage
from habla.data import inbox as data_inbox
from habla.kubeflow import watch

NAME = "cv-corpus-25.0-2026-03-09-es"


def _real_archive(clips: int = 6) -> bytes:
    """A small but real release archive (gzip'd tar) with a few kB per clip."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        members = [("cv-corpus-25.0-2026-03-09/es/train.tsv", b"client_id\tpath\tsentence\n")]
        members += [(f"cv-corpus-25.0-2026-03-09/es/clips/{k}.mp3", bytes([k]) * 5000 + bytes(range(256)) * 40)
                    for k in range(clips)]  # fmt: skip
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_an_archive_still_being_uploaded_is_not_submitted(kfp, tmp_path, monkeypatch):  # noqa: F811
    """A third of an archive was submitted and marked done, never retried."""
    inbox, state, out = str(tmp_path / "inbox"), str(tmp_path / "state"), str(tmp_path / "out")
    archive = Path(inbox, f"{NAME}.tar.gz")
    archive.parent.mkdir()
    whole = _real_archive()

    def poll() -> tuple[str, str]:
        [decision] = watch.watch(inbox, state, output_root=out, host=kfp.url, package=kfp.package)
        return decision.action, decision.detail

    archive.write_bytes(whole[: len(whole) // 3])
    assert poll()[0] == "waiting"  # first seen: its size must hold until the next poll
    action, detail = poll()  # the upload stalled: same size, but it does not read to its end
    assert action == "waiting" and "not a complete archive" in detail
    reads = []
    with monkeypatch.context() as m:
        m.setattr(data_inbox.commonvoice, "check_archive_end", lambda uri: reads.append(uri))
        assert poll() == (action, detail) and not reads  # that version is not streamed again at every poll
    archive.write_bytes(whole)
    assert poll()[0] == "waiting"  # it grew: seen anew
    assert poll()[0] == "submitted"
    assert poll()[0] == "known" and len(kfp.runs) == 1


def test_a_whole_gzip_of_a_cut_tar_waits_and_a_checksum_sidecar_does_not(kfp, tmp_path):  # noqa: F811
    inbox, state, out = str(tmp_path / "inbox"), str(tmp_path / "state"), str(tmp_path / "out")
    plain = gzip.decompress(_real_archive())
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        last = tar.getmembers()[-1].offset
    # A sound gzip stream whose tar was cut at a member boundary: only the tar's end blocks are missing.
    storage.write_bytes(storage.join(inbox, f"{NAME}.tgz"), gzip.compress(plain[:last]))
    for _ in range(3):
        [decision] = watch.watch(inbox, state, output_root=out, host=kfp.url, package=kfp.package)
        assert decision.action == "waiting"
    other = "cv-corpus-26.0-2026-06-10-es"
    storage.write_bytes(storage.join(inbox, f"{other}.tar.gz"), _real_archive())
    storage.write_text(storage.join(inbox, f"{other}.tar.gz.sha256"), "ab" * 32)  # written last by the uploader
    decisions = {
        d.release: d.action for d in watch.watch(inbox, state, output_root=out, host=kfp.url, package=kfp.package)
    }
    assert decisions == {NAME: "waiting", other: "submitted"}


def test_corrupt_state_files_count_as_absent(kfp, tmp_path, caplog):  # noqa: F811
    """A damaged claim, result or summary file made every later poll die with a traceback."""
    inbox, state, out = str(tmp_path / "inbox"), str(tmp_path / "state"), str(tmp_path / "out")
    releases = {f"cv-corpus-{v}-es": v for v in ("17.0-2024-03-15", "20.0-2024-12-06", "25.0-2026-03-09")}
    for name in releases:
        storage.write_bytes(storage.join(inbox, f"{name}.tar.gz"), _real_archive())
        storage.write_text(storage.join(inbox, f"{name}.tar.gz.sha256"), "ab" * 32)
    folder = Path(state, "releases")
    (folder / "cv-corpus-17.0-2024-03-15-es").mkdir(parents=True)
    (folder / "cv-corpus-17.0-2024-03-15-es" / "result.json").write_text('{"release": "cv-corpus-17.0')  # cut off
    (folder / "cv-corpus-20.0-2024-12-06-es").mkdir()
    (folder / "cv-corpus-20.0-2024-12-06-es" / "result.json").write_text('["not", "a", "record"]')
    (folder / "cv-corpus-20.0-2024-12-06-es" / "claim-0001.json").write_bytes(b"\xff\xfe garbage")
    (folder / "cv-corpus-25.0-2026-03-09-es").mkdir()
    (folder / "cv-corpus-25.0-2026-03-09-es" / "claim-0001.json").write_text(
        json.dumps({"status": "submitting", "expires_at": "next tuesday", "attempt": 1})
    )
    Path(state, "summary.json").write_text("{{{")
    with caplog.at_level(logging.WARNING, logger="habla"):
        decisions = {
            d.release: d.action for d in watch.watch(inbox, state, output_root=out, host=kfp.url, package=kfp.package)
        }
    assert decisions == dict.fromkeys(releases, "submitted")
    assert sum("corrupt state file, treated as absent" in r.getMessage() for r in caplog.records) >= 4
    summary = json.loads(Path(state, "summary.json").read_text())  # rebuilt from the (now sound) results
    assert summary["last_processed"] == {"es": "cv-corpus-25.0-2026-03-09-es"}
    again = {d.release: d.action for d in watch.watch(inbox, state, output_root=out, host=kfp.url, package=kfp.package)}
    assert set(again.values()) == {"known"} and len(kfp.runs) == 3
