"""habla download: a release from the Mozilla Data Collective (a stand-in on loopback, tests/mdc_standin.py),
resumed after a dropped connection and verified against its SHA-256, into a folder or a real S3 server."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import run_habla
from mdc_standin import KEY, MdcStandin

from habla import cli
from habla.core import storage
from habla.core.errors import HablaError
from habla.ops import mdc

NAME = "cv-corpus-25.0-2026-03-09-es.tar.gz"


@pytest.fixture
def archive() -> bytes:
    return os.urandom(3 * 1024 * 1024 + 12345)


@pytest.fixture
def standin(archive, monkeypatch):
    with MdcStandin(archive) as server:
        monkeypatch.setenv(mdc.API_URL_ENV, f"{server.url}/api")
        monkeypatch.setenv(mdc.API_KEY_ENV, KEY)
        yield server


def test_a_dropped_download_resumes_where_it_stopped_across_runs(standin, archive, tmp_path, capsys):
    out = tmp_path / "inbox"
    standin.drops = [1_000_000]
    assert cli.main(["download", "--out", str(out), "--attempts", "1"]) == 1  # a network fault: exit 1
    err = capsys.readouterr().err
    part = out / ".incoming" / f"{NAME}.part"
    kept = part.stat().st_size  # what arrived, to the 64 KiB read unit
    assert 900_000 < kept <= 1_000_000 and part.read_bytes() == archive[:kept] and not (out / NAME).exists()
    assert f"interrupted at {kept} bytes" in err and "run the same command again to resume" in err
    assert err.count("\n") == 1 and KEY not in err

    assert cli.main(["download", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["resumed_from"] == kept and result["verified"] is True
    assert result["sha256"] == hashlib.sha256(archive).hexdigest() and result["bytes"] == len(archive)
    assert (out / NAME).read_bytes() == archive
    assert standin.ranges() == [None, f"bytes={kept}-"]
    assert os.listdir(out / ".incoming") == []  # no .part, no state file left behind
    # The key went only to the download-session requests.
    assert all(("Authorization" in h) == (m == "POST") for m, _, h in standin.requests)

    assert cli.main(["download", "--out", str(out)]) == 0  # already there: nothing fetched again
    assert json.loads(capsys.readouterr().out)["already_there"] is True and standin.sessions == 2


def test_retries_within_one_run_resume_on_a_new_session(standin, archive, tmp_path):
    standin.drops = [700_000, 2_000_000]
    done = mdc.fetch(mdc.find_release("es", "25.0"), str(tmp_path))
    assert done.verified and Path(done.uri).read_bytes() == archive and 1_900_000 < done.resumed_from <= 2_000_000
    first, second = (int(r.removeprefix("bytes=").rstrip("-")) for r in standin.ranges()[1:])
    assert 600_000 < first <= 700_000 and second == done.resumed_from and standin.sessions == 3


def test_a_checksum_mismatch_deletes_the_download(standin, tmp_path):
    standin.checksum = hashlib.sha256(b"another archive").hexdigest()
    with pytest.raises(HablaError, match="SHA-256 .* differs from the Data Collective's"):
        mdc.fetch(mdc.find_release("es"), str(tmp_path))
    assert not (tmp_path / NAME).exists() and os.listdir(tmp_path / ".incoming") == []


def test_a_new_version_of_the_archive_or_a_server_ignoring_ranges_starts_afresh(standin, archive, tmp_path):
    standin.drops = [500_000]
    with pytest.raises(ConnectionError):
        mdc.fetch(mdc.find_release("es"), str(tmp_path), attempts=1)
    standin.archive = archive[::-1]  # republished: another checksum, so the old part is worthless
    standin.checksum = hashlib.sha256(standin.archive).hexdigest()
    done = mdc.fetch(mdc.find_release("es"), str(tmp_path))
    assert done.verified and done.resumed_from == 0 and Path(done.uri).read_bytes() == archive[::-1]
    assert standin.ranges()[-1] is None

    standin.drops, standin.ignore_range = [400_000], True
    other = tmp_path / "other"
    with pytest.raises(ConnectionError):
        mdc.fetch(mdc.find_release("es"), str(other), attempts=1)
    done = mdc.fetch(mdc.find_release("es"), str(other))
    assert done.verified and done.resumed_from == 0 and Path(done.uri).read_bytes() == archive[::-1]


def test_resume_into_s3_keeps_complete_segments(s3_bucket, monkeypatch):
    big = os.urandom(11 * 1024 * 1024 + 777)  # three segments of 5 MiB (S3's smallest multipart part)
    segment = 5 * 1024 * 1024
    with MdcStandin(big) as server:
        monkeypatch.setenv(mdc.API_URL_ENV, f"{server.url}/api")
        monkeypatch.setenv(mdc.API_KEY_ENV, KEY)
        server.drops = [8 * 1024 * 1024]  # mid-way through the second segment
        inbox = f"{s3_bucket}/inbox"
        with pytest.raises(ConnectionError):
            mdc.fetch(mdc.find_release("es"), inbox, attempts=1, segment_bytes=segment)
        assert not storage.exists(f"{inbox}/{NAME}")
        done = mdc.fetch(mdc.find_release("es"), inbox, segment_bytes=segment)
        assert done.resumed_from == segment and done.verified  # the unfinished segment is fetched again
        assert server.ranges() == [None, f"bytes={segment}-"]
    assert storage.read_bytes(done.uri) == big
    assert [i.uri for i in storage.list_files(inbox)] == [f"{inbox}/{NAME}"]


def test_download_cli_bad_input_is_one_line(standin, tmp_path):
    result = run_habla("download", "--out", str(tmp_path), "--version", "99.0",
                       env={mdc.API_URL_ENV: f"{standin.url}/api", mdc.API_KEY_ENV: KEY})  # fmt: skip
    assert result.returncode == 2 and "no Common Voice release 99.0" in result.stderr
    assert "(listed: 25.0)" in result.stderr
    result = run_habla("download", "--out", str(tmp_path), env={mdc.API_URL_ENV: f"{standin.url}/api",
                                                                  mdc.API_KEY_ENV: "wrong"})  # fmt: skip
    assert result.returncode == 2 and "HTTP 401" in result.stderr and "MDC_API_KEY" in result.stderr
    assert "Traceback" not in result.stderr and "wrong" not in result.stderr
