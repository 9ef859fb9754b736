"""Property-based test of ``habla download`` against a Data Collective that misbehaves (hypothesis).

Each example is a script for the stand-in (tests/standins/mdc_api.py): for each request in turn — the
catalog, a download session, the archive, whichever comes — either the right answer or a misbehaviour: an
HTTP status (4xx, 5xx, 429 with a Retry-After of seconds, a date or nonsense, a 3xx without a target, 204),
a wrong body (truncated, not JSON, an array, items of the wrong shape or types, a session without a URL or
with a size that is not a number, another checksum, an archive cut short, corrupt, too long, an error page,
said to be gzip), redirects (a few, or a loop), a hang-up before answering or mid-body, a slow answer
(within the timeout), or several of these at once. ``habla download`` runs in this process
(``habla.cli.main``, in a thread that must end within a minute), the backoff's waits recorded, not slept.
For every example:

* exit 0, 1 or 2; 2 only when the API refused a request (HTTP 4xx other than 408/429), 1 only when the
  stand-in did something wrong (not just slow answers, a few redirects or a gzip label);
* stderr at most one line, no traceback; every wait at most ``Backoff.longest``;
* the API key and the presigned URL's signature nowhere: stdout, stderr, log records, the names and content
  of every file written (the state under ``.incoming/`` included);
* on exit 0 the archive is complete and verified (the bytes served) and ``.incoming/`` is empty; otherwise
  there is no file under the archive's final name, and a second run against a well-behaved stand-in ends
  with exit 0 and the archive, resumed from what the first run kept or started afresh.

CI runs the ``ci`` profile (fixed examples, derandomized, with a deadline). The long profile:
``HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -m hostile_long tests/data/test_download_hostile.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import tempfile
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from standins.mdc_api import BODIES, HARMLESS, KEY, MdcStandin, Misbehaviour, leaks

from habla import cli
from habla.data import mdc

PROFILES = {
    "ci": {"max_examples": 100, "deadline": timedelta(seconds=30), "derandomize": True},
    "long": {"max_examples": 500, "deadline": None},
}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
ARCHIVE = random.Random(25).randbytes(300_000)  # five 64 KiB reads: room to stop, resume and corrupt
NAME = "cv-corpus-25.0-2026-03-09-es.tar.gz"
BACKOFF = mdc.Backoff(attempts=3)  # with the waits recorded, per example
LIMIT_S = 60  # a run still going after this long is a hang


def profile(**overrides) -> settings:
    return settings(
        **{**PROFILES[PROFILE], **overrides},
        database=None,  # nothing written into the repository
        suppress_health_check=[HealthCheck.too_slow],
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],  # no slow "explain"
        print_blob=True,
    )


@pytest.fixture(scope="module")
def standin():
    """One stand-in for all examples (reset before each), the environment pointing at it, short timeouts."""
    with MdcStandin(ARCHIVE) as server, pytest.MonkeyPatch.context() as patch:
        patch.setenv(mdc.API_URL_ENV, f"{server.url}/api")
        patch.setenv(mdc.API_KEY_ENV, KEY)
        patch.setattr(mdc, "TIMEOUT", (2, 2))  # slow answers below stay well within it
        yield server


STATUSES = [204, 301, 304, 400, 401, 403, 404, 408, 410, 416, 429, 500, 502, 503, 504]
RETRY_AFTER = [None, "0", "3", "99999", "soon", "Wed, 21 Oct 2015 07:28:00 GMT", "-5"]
ALL_BODIES = sorted({body for bodies in BODIES.values() for body in bodies})
stop_at = st.one_of(st.integers(0, 600), st.integers(0, len(ARCHIVE)))
misbehaviour = st.one_of(
    st.builds(Misbehaviour, status=st.sampled_from(STATUSES), retry_after=st.sampled_from(RETRY_AFTER)),
    st.builds(Misbehaviour, body=st.sampled_from(ALL_BODIES)),
    st.builds(Misbehaviour, redirects=st.sampled_from([1, 2, -1])),
    st.builds(Misbehaviour, hangup=st.just(True)),
    st.builds(Misbehaviour, stop_at=stop_at),
    st.builds(Misbehaviour, delay=st.sampled_from([0.05, 0.3])),
    st.builds(  # several at once
        Misbehaviour,
        delay=st.sampled_from([0.0, 0.05]),
        redirects=st.sampled_from([0, 1]),
        status=st.none() | st.sampled_from(STATUSES),
        body=st.none() | st.sampled_from(ALL_BODIES),
        stop_at=st.none() | stop_at,
    ),
)
scripts = st.lists(st.none() | misbehaviour, max_size=10)


def run_download(out: Path) -> tuple[int, str, str, str]:
    """``habla download --out OUT`` through the CLI's main() in this process: exit code, stdout, stderr and
    every log record (any level). A traceback escaping main() fails the example; so does a run past LIMIT_S."""
    stdout, stderr, records = io.StringIO(), io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(records)
    root = logging.getLogger()
    if not root.handlers:  # else main() would bind its log handler to this run's stderr
        root.addHandler(logging.NullHandler())
    level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    outcome: dict = {}

    def main() -> None:
        try:
            outcome["code"] = cli.main(["download", "--out", str(out)])
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the test's thread
            outcome["error"] = exc

    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            worker = threading.Thread(target=main, daemon=True)
            worker.start()
            worker.join(LIMIT_S)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert not worker.is_alive(), f"habla download still running after {LIMIT_S} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["code"], stdout.getvalue(), stderr.getvalue(), records.getvalue()


def check(server: MdcStandin, script: list[Misbehaviour | None]) -> None:
    server.reset()
    server.misbehave = list(script)
    waits: list[float] = []
    with tempfile.TemporaryDirectory(prefix="habla-mdc-") as where:
        out = Path(where) / "inbox"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(mdc, "BACKOFF", mdc.Backoff(attempts=BACKOFF.attempts, sleep=waits.append))
            code, stdout, stderr, logs = run_download(out)
        assert code in (0, 1, 2), stderr
        assert "Traceback" not in stderr and stderr.count("\n") <= 1 and (code == 0) == (stderr == ""), stderr
        assert not leaks(stdout, stderr, logs, folder=out), "a secret was printed, logged or stored"
        assert all(0 <= w <= BACKOFF.longest for w in waits), waits
        wrong = [(endpoint, what) for endpoint, done in server.served for what in done if what not in HARMLESS]
        refused = [e for e, what in wrong if e in ("catalog", "session") and what in _API_REFUSALS]
        assert code != 1 or wrong, f"exit 1 though the stand-in only ever misbehaved harmlessly: {stderr}"
        assert code != 2 or refused, f"exit 2 without an API refusal: {stderr}"
        if code == 0:
            assert_downloaded(out, stdout)
            return
        assert not (out / NAME).exists(), "a failed download was published"
        part = out / ".incoming" / f"{NAME}.part"
        kept = part.stat().st_size if part.exists() else 0
        server.reset()  # the second run: a well-behaved Data Collective
        code, stdout, stderr, logs = run_download(out)
        assert code == 0, stderr
        assert json.loads(stdout)["resumed_from"] in (0, kept)
        assert_downloaded(out, stdout)
        assert not leaks(stdout, stderr, logs, folder=out)


# An API status that is the user's to fix (exit 2): a 4xx other than 408 and 429.
_API_REFUSALS = {f"status:{code}" for code in STATUSES if 400 <= code < 500 and code not in (408, 429)}


def assert_downloaded(out: Path, stdout: str) -> None:
    result = json.loads(stdout)
    assert result["verified"] is True and result["bytes"] == len(ARCHIVE)
    assert (out / NAME).read_bytes() == ARCHIVE
    assert os.listdir(out / ".incoming") == []


def _over_and_over(trouble: Misbehaviour) -> list[Misbehaviour]:
    return [trouble] * 12


@profile()
@given(script=scripts)
@example(script=_over_and_over(Misbehaviour(status=500)))  # the reported case: HTTP 500 was exit 2, unretried
@example(script=[Misbehaviour(redirects=-1)])  # the reported case: a redirect loop was exit 2
@example(script=[Misbehaviour(body="not-json")])
@example(script=[None, Misbehaviour(body="size-not-numeric")])
@example(script=[None, None, *_over_and_over(Misbehaviour(hangup=True))])
@example(script=[None, None, Misbehaviour(body="corrupt")])
@example(script=[None, None, Misbehaviour(stop_at=200_000), None, Misbehaviour(status=503, retry_after="3")])
def test_a_misbehaving_data_collective_keeps_every_promise(standin, script):
    check(standin, script)


@pytest.mark.hostile_long
@profile(max_examples=PROFILES["long"]["max_examples"], deadline=None, derandomize=False)
@given(script=scripts)
def test_a_misbehaving_data_collective_keeps_every_promise_long(standin, script):
    check(standin, script)
