"""habla.core.claims: created-once claims and the one-writer lease, locally and on a real S3 server, with real
processes holding and losing it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from habla.core import claims, state, storage
from habla.core.errors import HablaError

HOLDER = r"""
import sys, time
from habla.core import claims
lease = claims.Lease(sys.argv[1], "the output", ttl=float(sys.argv[2])).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _hold(uri: str, ttl: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, uri, str(ttl)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> str:
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_bucket") + "/out"


def test_a_live_writer_keeps_others_out_and_a_released_lease_is_free(where):
    uri = storage.join(where, ".lease.json")
    holder = _hold(uri, ttl=1.0)  # renews every 0.2 s
    try:
        started = time.monotonic()
        with pytest.raises(HablaError, match=r"^the output is being written by .*: wait for it to finish"):
            claims.Lease(uri, "the output", ttl=1.0).acquire()
        assert time.monotonic() - started < 3, "a live writer is recognised by its renewals, not waited out"
    finally:
        holder.terminate()
        holder.wait()
    # The holder died without releasing it: on S3 its lease is taken once it expires, locally at once
    with claims.Lease(uri, "the output", ttl=1.0) as lease:
        assert not lease.lost
    assert json.loads(storage.read_text(uri))["released"] is True
    claims.Lease(uri, "the output", ttl=1.0).acquire().release()  # free again


def test_a_killed_writer_on_this_machine_is_taken_over_at_once(tmp_path):
    uri = str(tmp_path / ".lease.json")
    holder = _hold(uri, ttl=300.0)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    claims.Lease(uri, "the output", ttl=300.0).acquire().release()
    assert time.monotonic() - started < 2


def test_a_holder_that_stalls_past_its_lease_loses_it(tmp_path):
    uri = str(tmp_path / ".lease.json")
    stalled = claims.Lease(uri, "the output", ttl=0.5, renew_every=60).acquire()  # never renews in time
    time.sleep(0.6)
    with claims.Lease(uri, "the output", ttl=30) as taker:
        stalled.renew_every = 0.05
        stalled._renew()  # its next renewal finds the record changed
        assert stalled.lost and not taker.lost
    stalled.release()  # leaves the taker's record alone
    assert json.loads(storage.read_text(uri))["owner"] == taker.owner


def test_a_claim_is_created_once_then_compared(where):
    uri = storage.join(where, "claim.json")
    first = claims.claim(uri, {"release": "r1", "options": {"a": 1}, "by": "p1"}, ("release", "options"))
    again = claims.claim(uri, {"release": "r1", "options": {"a": 1}, "by": "p2"}, ("release", "options"))
    other = claims.claim(uri, {"release": "r2", "options": {"a": 1}, "by": "p3"}, ("release", "options"))
    assert (first.created, first.mine) == (True, True) and (again.created, again.mine) == (False, True)
    assert (other.created, other.mine) == (False, False) and other.holder["by"] == "p1"
    storage.write_text(uri, "{not json")
    with pytest.raises(state.Corrupt, match=r"claim.json: corrupt .*; delete it"):
        claims.claim(uri, {"release": "r1", "options": {}}, ("release", "options"), remedy="delete it")
