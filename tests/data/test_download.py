"""habla download: a release from the Mozilla Data Collective (a stand-in on loopback, tests/standins/mdc_api.py),
resumed after a dropped connection and verified against its SHA-256, into a folder or a real S3 server; and a
Data Collective that fails, loops or answers nonsense (retried with backoff, then one line: exit 1 for the
service's faults, 2 for the user's input). The generated version of these: test_download_hostile.py."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from fixtures.commands import run_habla
from standins.mdc_api import BODIES, KEY, SIGNATURE, MdcStandin, Misbehaviour, leaks

from habla import cli
from habla.core import storage
from habla.core.errors import Fault
from habla.data import downloads, mdc

NAME = "cv-corpus-25.0-2026-03-09-es.tar.gz"
ONE_TRY = mdc.Backoff(attempts=1)


@pytest.fixture
def archive() -> bytes:
    return os.urandom(3 * 1024 * 1024 + 12345)


@pytest.fixture
def standin(archive, monkeypatch):
    with MdcStandin(archive) as server:
        monkeypatch.setenv(mdc.API_URL_ENV, f"{server.url}/api")
        monkeypatch.setenv(mdc.API_KEY_ENV, KEY)
        yield server


@pytest.fixture(autouse=True)
def waits(monkeypatch) -> list[float]:
    """The backoff's waits, recorded instead of slept."""
    waited: list[float] = []
    monkeypatch.setattr(mdc, "BACKOFF", mdc.Backoff(sleep=waited.append))
    return waited


def download(capsys, caplog, out: Path, *args: str) -> tuple[int, str, str]:
    """``habla download --out OUT ARGS`` in this process: exit code, stdout, stderr; with its logs checked for
    secrets, as its output and every file it wrote."""
    caplog.set_level("DEBUG")
    code = cli.main(["download", "--out", str(out), *args])
    printed = capsys.readouterr()
    assert not leaks(printed.out, printed.err, caplog.text, folder=out)
    assert "Traceback" not in printed.err and printed.err.count("\n") == (code != 0)
    return code, printed.out, printed.err


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
    done = downloads.fetch(mdc.find_release("es", "25.0"), str(tmp_path))
    assert done.verified and Path(done.uri).read_bytes() == archive and 1_900_000 < done.resumed_from <= 2_000_000
    first, second = (int(r.removeprefix("bytes=").rstrip("-")) for r in standin.ranges()[1:])
    assert 600_000 < first <= 700_000 and second == done.resumed_from and standin.sessions == 3


def test_a_checksum_mismatch_deletes_the_download(standin, tmp_path):
    standin.checksum = hashlib.sha256(b"another archive").hexdigest()
    with pytest.raises(Fault, match="SHA-256 .* differs from the Data Collective's"):
        downloads.fetch(mdc.find_release("es"), str(tmp_path))
    assert not (tmp_path / NAME).exists() and os.listdir(tmp_path / ".incoming") == []


def test_a_new_version_of_the_archive_or_a_server_ignoring_ranges_starts_afresh(standin, archive, tmp_path):
    standin.drops = [500_000]
    with pytest.raises(Fault, match="interrupted at"):
        downloads.fetch(mdc.find_release("es"), str(tmp_path), backoff=ONE_TRY)
    standin.archive = archive[::-1]  # republished: another checksum, so the old part is worthless
    standin.checksum = hashlib.sha256(standin.archive).hexdigest()
    done = downloads.fetch(mdc.find_release("es"), str(tmp_path))
    assert done.verified and done.resumed_from == 0 and Path(done.uri).read_bytes() == archive[::-1]
    assert standin.ranges()[-1] is None

    standin.drops, standin.ignore_range = [400_000], True
    other = tmp_path / "other"
    with pytest.raises(Fault, match="interrupted at"):
        downloads.fetch(mdc.find_release("es"), str(other), backoff=ONE_TRY)
    done = downloads.fetch(mdc.find_release("es"), str(other))
    assert done.verified and done.resumed_from == 0 and Path(done.uri).read_bytes() == archive[::-1]


def test_resume_into_s3_keeps_complete_segments(s3_bucket, monkeypatch):
    big = os.urandom(11 * 1024 * 1024 + 777)  # three segments of 5 MiB (S3's smallest multipart part)
    segment = 5 * 1024 * 1024
    with MdcStandin(big) as server:
        monkeypatch.setenv(mdc.API_URL_ENV, f"{server.url}/api")
        monkeypatch.setenv(mdc.API_KEY_ENV, KEY)
        server.drops = [8 * 1024 * 1024]  # mid-way through the second segment
        inbox = f"{s3_bucket}/inbox"
        with pytest.raises(Fault, match="interrupted at"):
            downloads.fetch(mdc.find_release("es"), inbox, backoff=ONE_TRY, segment_bytes=segment)
        assert not storage.exists(f"{inbox}/{NAME}")
        done = downloads.fetch(mdc.find_release("es"), inbox, segment_bytes=segment)
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


# ------------------------------------------------------------------ a Data Collective that fails or misbehaves


def test_5xx_429_and_dropped_connections_are_retried_on_every_request_with_backoff(
    standin, archive, tmp_path, capsys, caplog, waits
):
    standin.misbehave = [
        Misbehaviour(status=500),  # the catalog: waits 2 s
        Misbehaviour(hangup=True),  # the catalog again: 4 s
        None,
        Misbehaviour(status=429, retry_after="7"),  # the download session: as the server asks
        None,
        Misbehaviour(status=503, retry_after="99999"),  # the archive: no more than Backoff.longest
        None,
        Misbehaviour(stop_at=1_000_000),  # the archive, resumed next: 2 s × 2² (the third failure)
    ]
    code, out, _ = download(capsys, caplog, tmp_path)
    assert code == 0 and waits == [2, 4, 7, 60, 8]
    result = json.loads(out)
    assert result["verified"] and 900_000 < result["resumed_from"] <= 1_000_000
    assert (tmp_path / NAME).read_bytes() == archive


@pytest.mark.parametrize("request_number", [1, 2, 3], ids=["catalog", "session", "archive"])
def test_http_500_after_the_retries_is_exit_1_with_one_line(standin, tmp_path, capsys, caplog, request_number, waits):
    standin.misbehave = [None] * (request_number - 1) + [Misbehaviour(status=500)] * 12
    code, _, err = download(capsys, caplog, tmp_path)
    assert code == 1 and "HTTP 500 on" in err and "4 attempts" in err and waits == [2, 4, 8]
    assert "?" not in err  # the request named without its query string
    assert not (tmp_path / NAME).exists()


@pytest.mark.parametrize("request_number", [1, 2, 3], ids=["catalog", "session", "archive"])
def test_a_redirect_loop_is_exit_1_with_one_line_and_a_few_redirects_are_followed(
    standin, archive, tmp_path, capsys, caplog, request_number
):
    standin.misbehave = [None] * (request_number - 1) + [Misbehaviour(redirects=-1)]
    code, _, err = download(capsys, caplog, tmp_path)
    assert code == 1 and "redirect loop" in err and not (tmp_path / NAME).exists()
    standin.reset()
    standin.misbehave = [None] * (request_number - 1) + [Misbehaviour(redirects=3)]
    assert download(capsys, caplog, tmp_path)[0] == 0 and (tmp_path / NAME).read_bytes() == archive


NONSENSE = [
    *(("catalog", body) for body in BODIES["catalog"]),
    *(("session", body) for body in BODIES["session"] if body not in ("wrong-checksum", "size-wrong")),
]


@pytest.mark.parametrize(("endpoint", "body"), NONSENSE, ids=[f"{e}-{b}" for e, b in NONSENSE])
def test_a_malformed_answer_is_exit_1_with_one_line(standin, tmp_path, capsys, caplog, endpoint, body):
    standin.misbehave = [None] * (endpoint == "session") + [Misbehaviour(body=body)]
    code, _, err = download(capsys, caplog, tmp_path)
    assert code == 1 and "Mozilla Data Collective answered nonsense" in err, err
    assert not (tmp_path / NAME).exists()


@pytest.mark.parametrize("version", ["abc", "25.x", "-1", "", "25..0", "1" * 60, "99.0"])
def test_an_unknown_or_malformed_version_is_exit_2_with_one_line(standin, tmp_path, capsys, caplog, version):
    code, _, err = download(capsys, caplog, tmp_path, "--version", version)
    assert code == 2 and ("is not a version such as 25.0" in err or "no Common Voice release 99.0" in err), err


def test_25_is_the_release_25_0_and_a_malformed_locale_is_exit_2(standin, archive, tmp_path, capsys, caplog):
    code, _, err = download(capsys, caplog, tmp_path, "--locale", "../es")
    assert code == 2 and "is not a Common Voice locale" in err
    assert download(capsys, caplog, tmp_path, "--version", "25")[0] == 0 and (tmp_path / NAME).read_bytes() == archive


def test_partial_or_corrupt_archives_are_never_published(standin, archive, tmp_path, capsys, caplog):
    standin.misbehave = [None, None, Misbehaviour(body="corrupt")]  # every byte arrives, one of them wrong
    code, _, err = download(capsys, caplog, tmp_path)
    assert code == 1 and "differs from the Data Collective's" in err
    assert not (tmp_path / NAME).exists() and os.listdir(tmp_path / ".incoming") == []

    standin.misbehave = [None, None, Misbehaviour(body="longer"), None, Misbehaviour(body="truncated")]
    code, _, err = download(capsys, caplog, tmp_path, "--attempts", "2")  # too long: dropped; too short: kept
    assert code == 1 and f"stopped at {len(archive) // 2} of {len(archive)} bytes" in err
    assert not (tmp_path / NAME).exists()
    assert (tmp_path / ".incoming" / f"{NAME}.part").read_bytes() == archive[: len(archive) // 2]

    standin.misbehave = [None, None, Misbehaviour(body="content-encoding")]  # the bytes as sent, not gunzipped
    code, out, _ = download(capsys, caplog, tmp_path)
    assert code == 0 and json.loads(out)["resumed_from"] == len(archive) // 2
    assert (tmp_path / NAME).read_bytes() == archive


def test_an_answer_stalled_past_the_read_timeout_is_retried_and_a_slow_one_is_fine(
    standin, archive, tmp_path, capsys, caplog, monkeypatch
):
    monkeypatch.setattr(mdc, "TIMEOUT", (2, 0.3))
    standin.misbehave = [Misbehaviour(delay=1.0)] * 4
    code, _, err = download(capsys, caplog, tmp_path)
    assert code == 1 and "ReadTimeout on GET" in err
    standin.misbehave = [Misbehaviour(delay=0.1)] * 3
    assert download(capsys, caplog, tmp_path)[0] == 0 and (tmp_path / NAME).read_bytes() == archive


def test_secrets_stay_out_of_messages_logs_output_and_state(standin, tmp_path, capsys, caplog):
    """The stand-in echoes the request (its signed URL, its Authorization header) in its error messages."""
    standin.misbehave = [None, None, Misbehaviour(status=403), None, Misbehaviour(stop_at=500_000)]
    code, _, err = download(capsys, caplog, tmp_path, "--attempts", "2")  # download() looks for the secrets
    assert code == 1 and "interrupted at" in err and (tmp_path / ".incoming" / f"{NAME}.json").exists()
    standin.misbehave = [None, Misbehaviour(status=400)]
    code, _, err = download(capsys, caplog, tmp_path)
    assert code == 2 and "HTTP 400 on POST" in err and "misbehaving on purpose" in err
    assert any(SIGNATURE in path for _, path, _ in standin.requests)  # handed out and used, never shown


def test_describe_names_a_request_without_query_or_user_info():
    import requests

    signed = requests.Request("GET", f"https://user:pw@cdn.example/a/b.tar.gz?X-Amz-Signature={SIGNATURE}").prepare()
    assert mdc.describe(signed) == "GET https://cdn.example/a/b.tar.gz"


def test_a_checksum_that_is_not_a_sha256_is_kept_unverified(standin, archive, tmp_path, capsys, caplog):
    standin.checksum = "md5:0123"
    code, out, _ = download(capsys, caplog, tmp_path)
    assert code == 0 and json.loads(out)["verified"] is False and (tmp_path / NAME).read_bytes() == archive


def test_download_cli_service_fault_is_exit_1_with_one_line(standin, tmp_path):
    """The reported case, as a user runs it: HTTP 500 was exit 2 (one try, so no retry warnings on stderr)."""
    standin.misbehave = [Misbehaviour(status=500)]
    result = run_habla("download", "--out", str(tmp_path), "--attempts", "1",
                       env={mdc.API_URL_ENV: f"{standin.url}/api", mdc.API_KEY_ENV: KEY})  # fmt: skip
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "HTTP 500 on GET" in result.stderr
    assert "Traceback" not in result.stderr and not leaks(result.stdout, result.stderr, folder=tmp_path)
