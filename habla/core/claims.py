"""Exactly once: of two processes about to do the same thing, one does it. The one home of habla's claims.

Three forms, all on conditional writes (habla.core.conditional: S3 ``If-None-Match``/``If-Match``, locally a
hard link and a rename under a lock file):

* :func:`claim` — a record created once, then compared: a prepared dataset's ``plan/claim.json`` (its release
  and options), a run folder's ``run.json`` (its KFP run id). Whoever comes second reads the holder back and
  cooperates when it is the same, or is refused.
* :class:`AttemptClaims` — numbered attempts with a lease (``claim-0001.json`` …): the watcher's submission of
  a release or download. An attempt whose lease expired (a killed watcher) is followed by the next one.
  The same methods over Kubernetes Leases are habla.kubeflow.lease.LeaseAttempts, for stores that do not
  enforce conditional writes.
* :func:`swap` — a record replaced by compare-and-swap on the version read: ``models/best.json``.
* :class:`Lease` — one writer at a time, renewed while it works: a training run's output folder.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from habla.core import conditional, state, storage
from habla.core.errors import HablaError

log = logging.getLogger(__name__)

SWAP_ATTEMPTS = 20  # compare-and-swap rounds before giving up (each lost round means another writer won)


# ----------------------------------------------------------------------------------- created once, compared


@dataclass(frozen=True)
class Claim:
    """Who holds a claim: ``holder`` is the record there now; ``mine`` when its keys are the caller's."""

    holder: dict
    created: bool  # this call wrote it
    mine: bool


def claim(uri: str, record: dict, keys: Sequence[str], *, remedy: str = "") -> Claim:
    """Bind ``uri`` to ``record``: create it unless something is there, then read back what holds.

    The claim is the caller's (``mine``) when the holder's ``keys`` equal ``record``'s: the caller created it,
    or an earlier attempt of the same work did (a retried step, a concurrent run with the same inputs). A store
    that refuses the conditional header (501 NotImplemented) gets a plain write; the read back decides, and a
    store that ignores the header is caught there too when the claims come one after the other. A holder that
    is not a JSON object with ``keys`` is :class:`~habla.core.state.Corrupt` (with ``remedy``).
    """
    holder = state.read(uri, keys, remedy=remedy)
    created = False
    if holder is None:
        try:
            created = state.create(uri, record)
        except Exception as exc:
            if not conditional.refused(exc):
                raise
            log.warning("%s: the store refuses conditional writes; writing the claim plainly", uri)
            state.write(uri, record)
            created = True
        holder = state.load(uri, keys, what="claim", remedy=remedy)
    mine = all(holder.get(k) == record.get(k) for k in keys)
    return Claim(holder, created and mine, mine)


# --------------------------------------------------------------------------------- compare-and-swap


def swap(
    uri: str,
    change: Callable[[dict | None], dict | None],
    required: state.Required = (),
    *,
    remedy: str = "",
    attempts: int = SWAP_ATTEMPTS,
) -> dict | None:
    """Replace the record at ``uri`` with ``change(current)`` (None: no record yet), by compare-and-swap.

    ``change`` returns the new record, or None to leave the current one as it is (then None is returned). When
    another writer replaced the record between the read and the write, the write is refused and ``change`` is
    asked again with the new current record. Returns the record written. A current record that is not a JSON
    object with the ``required`` fields is :class:`~habla.core.state.Corrupt`; HablaError after ``attempts``
    rounds.
    """
    for _ in range(attempts):
        current = conditional.read_versioned(uri)
        try:
            value = state.parse(current.data, required) if current else None
        except ValueError as exc:
            raise state.Corrupt(f"{uri}: corrupt ({exc})" + (f"; {remedy}" if remedy else "")) from None
        new = change(value)
        if new is None:
            return None
        if conditional.write_if_match(uri, state.dumps(new).encode("utf-8"), current.etag if current else None):
            return new
        log.info("%s changed while it was being replaced: reading it again", uri)
    raise HablaError(f"{uri} kept changing: not replaced after {attempts} attempts")


# ---------------------------------------------------------------------------------- attempts with a lease


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds")


@dataclass
class Attempt:
    """One attempt at a piece of work (a release, a download) that its taker holds until ``expires``."""

    attempt: int
    expires: dt.datetime
    uri: str = ""  # the claim file (AttemptClaims)
    held: Any = None  # a habla.kubeflow.lease.Held (LeaseClaims)
    annotations: dict = field(default_factory=dict)


class Claims(Protocol):
    """How attempts are claimed: files in the state store (:class:`AttemptClaims`) or Kubernetes Leases
    (habla.kubeflow.lease.LeaseAttempts)."""

    mode: str

    def take(self, folder: str, owner: str, lease: float) -> tuple[Attempt | None, str]: ...
    def still_ours(self, attempt: Attempt) -> bool: ...
    def finish(self, attempt: Attempt, status: str, **fields: Any) -> None: ...
    def fail(self, attempt: Attempt, error: str) -> None: ...
    def drop(self, attempt: Attempt) -> None: ...


_ATTEMPT = re.compile(r"claim-(\d+)\.json")
_ATTEMPT_FIELDS = {"status": str, "expires_at": str}


class AttemptClaims:
    """Attempts as files in a folder of the state store: ``claim-0001.json``, ``claim-0002.json`` …, each created
    with a conditional write, so of two takers racing for the same attempt one wins. An attempt is live while it
    is ``submitting`` and its lease has not expired; a failed or expired one is followed by the next number."""

    mode = "s3"

    def take(self, folder: str, owner: str, lease: float) -> tuple[Attempt | None, str]:
        """The next attempt in ``folder``, or ``(None, why)`` when another taker holds a live one or won the race."""
        now = _now()
        taken = sorted(i.uri for i in storage.list_files(folder) if _ATTEMPT.fullmatch(storage.name(i.uri)))
        number = 1
        if taken:
            last = _live(taken[-1], now)
            if last:
                return None, f"in progress by {last.get('owner')} until {last['expires_at']}"
            number = int(_ATTEMPT.fullmatch(storage.name(taken[-1]))[1]) + 1
        uri = storage.join(folder, f"claim-{number:04d}.json")
        expires = now + dt.timedelta(seconds=lease)
        record = {"attempt": number, "owner": owner, "status": "submitting", "started_at": _iso(now),
                  "expires_at": _iso(expires)}  # fmt: skip
        if not state.create(uri, record):
            return None, "claimed by another watcher at the same moment"
        return Attempt(number, dt.datetime.fromisoformat(record["expires_at"]), uri=uri), ""

    def still_ours(self, attempt: Attempt) -> bool:
        return _now() < attempt.expires

    def finish(self, attempt: Attempt, status: str, **fields: Any) -> None:
        """Mark the attempt done (no longer live): a release resubmitted later (habla watch --resubmit) must not
        wait for a finished attempt's lease to run out."""
        _update(attempt.uri, status=status, **fields)

    def fail(self, attempt: Attempt, error: str) -> None:
        """Mark the attempt failed: the next taker may start a new one at once."""
        _update(attempt.uri, status="failed", error=error)

    def drop(self, attempt: Attempt) -> None:
        storage.delete(attempt.uri)


def _live(uri: str, now: dt.datetime) -> dict | None:
    """The attempt at ``uri`` if it is in progress and its lease has not expired (a damaged file is not live)."""
    record = state.read(uri, _ATTEMPT_FIELDS, fallback="treated as absent")
    if record is None or record["status"] != "submitting":
        return None
    try:
        return record if dt.datetime.fromisoformat(record["expires_at"]) > now else None
    except (TypeError, ValueError):  # a date that does not parse, or one without a time zone
        log.warning("%s: corrupt state file, treated as absent (expires_at %r)", uri, record["expires_at"])
        return None


def _update(claim_uri: str, /, **fields: Any) -> None:
    record = state.read(claim_uri, fallback="rewritten") or {}
    record.update(fields, updated_at=_iso(_now()))
    state.write(claim_uri, record, indent=2)


# ------------------------------------------------------------------------------ one writer at a time


class Lease:
    """One writer at a time for what ``uri`` guards (a training run's output folder): a record ``{owner,
    expires_at, renewals}`` replaced only by compare-and-swap, renewed in the background while the holder works.

    Taking it: free, released, expired, or held by a process of this machine that is gone → taken. Held by a
    live writer (its renewals advance while this one waits) → HablaError naming it. A writer killed elsewhere
    without releasing it (a crashed pod) stops renewing: the lease is taken once it expires, so a retry never
    waits more than ``ttl``.
    ``lost`` turns True if a renewal finds the record changed under it (the holder stalled past ``ttl``); the
    holder must then publish nothing.
    """

    def __init__(self, uri: str, what: str, ttl: float = 300.0, renew_every: float | None = None) -> None:
        self.uri, self.what, self.ttl = uri, what, ttl
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.renew_every = renew_every if renew_every is not None else ttl / 5
        self.lost = False
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, renewals: int) -> bytes:
        expires = _now() + dt.timedelta(seconds=self.ttl)
        value = {"owner": self.owner, "expires_at": expires.isoformat(), "renewals": renewals}
        return state.dumps(value).encode("utf-8")

    def acquire(self) -> Lease:
        """Take the lease (see the class doc) and start renewing it; HablaError when a live writer holds it."""
        seen: tuple[str, Any] | None = None  # (owner, renewals) of a holder this call is waiting out
        deadline = time.monotonic() + self.ttl + self.renew_every
        while True:
            current = conditional.read_versioned(self.uri)
            holder = _lease_holder(current, self.uri)
            free = holder is None or holder["expires"] <= _now() or _gone(holder["owner"])
            if free:
                data = self._record(0)
                if conditional.write_if_match(self.uri, data, current.etag if current else None):
                    self._etag = conditional.read_versioned(self.uri).etag
                    self._thread = threading.Thread(target=self._renew, name="habla-lease", daemon=True)
                    self._thread.start()
                    return self
                continue  # another taker won this round: look again
            now_seen = (holder["owner"], holder["renewals"])
            if seen is not None and now_seen != seen or time.monotonic() > deadline:
                until = holder["expires"].isoformat(timespec="seconds")
                raise HablaError(
                    f"{self.what} is being written by {holder['owner']} (its lease {self.uri} is renewed until "
                    f"{until}): wait for it to finish, or use another output"
                )
            seen = now_seen
            log.info("%s: held by %s; waiting to see whether it is still renewed", self.uri, holder["owner"])
            time.sleep(min(self.renew_every, max(0.05, (holder["expires"] - _now()).total_seconds())))

    def _renew(self) -> None:
        renewals = 0
        while not self._stop.wait(self.renew_every):
            renewals += 1
            data = self._record(renewals)
            if not conditional.write_if_match(self.uri, data, self._etag):
                self.lost = True
                log.error("%s: the lease was taken by another writer; nothing more is published", self.uri)
                return
            self._etag = conditional.read_versioned(self.uri).etag

    def release(self) -> None:
        """Stop renewing and free the lease (a record that is no longer ours is left alone)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if not self.lost and self._etag is not None:
            released = {"owner": self.owner, "expires_at": _now().isoformat(), "renewals": -1, "released": True}
            conditional.write_if_match(self.uri, state.dumps(released).encode("utf-8"), self._etag)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _gone(owner: str) -> bool:
    """Whether ``owner`` (``host:pid:…``) is a process of this machine that no longer runs."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _lease_holder(current: conditional.Versioned | None, uri: str) -> dict | None:
    """The lease's holder ``{owner, expires, renewals}``; None when there is no record or it cannot be read (a
    damaged record protects nothing)."""
    if current is None:
        return None
    try:
        record = state.parse(current.data, {"owner": str, "expires_at": str})
        return {"owner": record["owner"], "expires": dt.datetime.fromisoformat(record["expires_at"]),
                "renewals": record.get("renewals")}  # fmt: skip
    except (ValueError, TypeError):
        log.warning("%s: not a lease record, taken over", uri)
        return None
