"""Conditional writes: create a file only if it is absent, replace it only if it is still the version read
(compare-and-swap), and a probe that checks, by writing, that a store enforces both.

S3: ``PUT`` with ``If-None-Match: *`` and ``If-Match: <etag>``, which AWS S3, MinIO and recent SeaweedFS honour
(docs/operations.md lists the stores). Local: a hard link of a finished temporary file (``link(2)`` refuses an
existing name) and a rename under an ``flock`` lock file.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from habla.core import storage
from habla.core.errors import HablaError, one_line

# What a store answers to a conditional write that lost: 412 Precondition Failed, or 409 when two raced (AWS).
_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def refused(exc: Exception) -> bool:
    """True for a store's answer that it does not do conditional writes at all (501 NotImplemented)."""
    return storage.error_code(exc) in ("NotImplemented", "501")


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create ``uri`` only if nothing exists there; False if something does. Safe between concurrent writers.

    S3: a conditional PUT (``If-None-Match: *``), which AWS S3, MinIO and SeaweedFS honour.
    Local: a hard link of a finished temporary file, which fails if the name exists.
    """
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        try:
            storage.s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except Exception as exc:
            if storage.error_code(exc) in _CONFLICT_CODES:
                return False
            raise
    path = Path(uri)
    fd, tmp = storage.temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)


@dataclass(frozen=True)
class Versioned:
    """An object's bytes and the version a compare-and-swap must name: the S3 ETag, or locally a content hash."""

    data: bytes
    etag: str


def _content_tag(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _folder_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``.<name>.lock`` beside ``path``: local compare-and-swaps of one file take turns."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_versioned(uri: str) -> Versioned | None:
    """The object and its version (for :func:`write_if_match`), or None when there is none."""
    if not storage.is_s3(uri):
        try:
            data = Path(uri).read_bytes()
        except FileNotFoundError:
            return None
        return Versioned(data, _content_tag(data))
    bucket, key = storage.split_s3(uri)
    try:
        response = storage.s3_client().get_object(Bucket=bucket, Key=key)
        return Versioned(response["Body"].read(), response["ETag"])
    except Exception as exc:
        if storage.is_not_found(exc):
            return None
        raise


def write_if_match(uri: str, data: bytes, etag: str | None) -> bool:
    """Replace ``uri`` only if it is still at version ``etag`` (None: only if nothing is there).

    False when another writer changed it first: re-read and decide again. S3: a ``PUT`` with ``If-Match: <etag>``
    (``If-None-Match: *`` for None); a store must enforce these (:func:`probe_conditional_writes`). Local: the
    version is checked and the new file renamed into place under a lock file, so two writers cannot interleave.
    """
    if etag is None:
        return create_exclusive(uri, data)
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        try:
            storage.s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=etag)
            return True
        except Exception as exc:
            if storage.error_code(exc) in _CONFLICT_CODES or storage.is_not_found(exc):
                return False
            raise
    path = Path(uri)
    with _folder_lock(path):
        try:
            current = _content_tag(path.read_bytes())
        except FileNotFoundError:
            return False
        if current != etag:
            return False
        storage.write_bytes(uri, data)
        return True


@dataclass(frozen=True)
class StoreProbe:
    """What a store showed about conditional writes, checked by writing to it (:func:`probe_conditional_writes`)."""

    store: str  # "s3://bucket at http://endpoint" or "local folder /path"
    conditional_create: bool  # PUT If-None-Match: * refuses an existing key (also when two race)
    compare_and_swap: bool  # PUT If-Match: <etag> refuses a stale ETag and accepts the current one
    detail: str  # what the store answered, one line
    checked: float  # time.monotonic() of the check

    @property
    def ok(self) -> bool:
        return self.conditional_create and self.compare_and_swap


PROBE_TTL_SECONDS = 3600.0
_probes: dict[tuple[str, str], StoreProbe] = {}
# Stores whose conditional writes race under concurrency although one at a time they pass the probe: (server
# name in the S3 Server header, the first release that is safe, why). SeaweedFS answers "SeaweedFS <size limit>
# <major>.<minor>" (weed/s3api/stats.go, weed/util/version/constants.go); before 4.18 concurrent PUTs with
# If-None-Match: * could all succeed (seaweedfs#8800, fixed by #8802 in 4.18); KFP 2.16 ships 4.00.
RACY_STORES = (("SeaweedFS", (4, 18), "concurrent If-None-Match PUTs can all succeed before 4.18 (seaweedfs#8800)"),)


def known_race(server: str) -> str | None:
    """Why the S3 store answering with this ``Server`` header cannot be trusted with claims, or None."""
    words = server.split()
    for name, fixed, why in RACY_STORES:
        if not words or words[0] != name:
            continue
        try:
            version = tuple(int(p) for p in words[-1].split(".")[:2])
        except ValueError:
            return f"{server!r}: an unknown {name} release; {why}"
        if version < fixed:
            return f"{server}: {why}"
    return None


def _server_header(bucket: str) -> str:
    """The store's ``Server`` header (a HEAD of the bucket); '' when it sends none."""
    answer = storage.s3_client().head_bucket(Bucket=bucket)
    return str((answer.get("ResponseMetadata") or {}).get("HTTPHeaders", {}).get("server", ""))


def _put_outcome(bucket: str, key: str, body: bytes, **condition: str) -> str:
    """The status of one conditional PUT: 200, 412, 409, or 501 (the store refuses the header). Other errors
    (access denied, endpoint down) raise: they say nothing about conditional writes."""
    try:
        storage.s3_client().put_object(Bucket=bucket, Key=key, Body=body, **condition)
        return "200"
    except Exception as exc:
        code = storage.error_code(exc)
        if code in ("PreconditionFailed", "412"):
            return "412"
        if code in ("ConditionalRequestConflict", "409"):
            return "409"
        if refused(exc):
            return "501"
        raise


def _probe_s3(bucket: str, key: str) -> tuple[bool, bool, str]:
    from concurrent.futures import ThreadPoolExecutor

    lost = {"412", "409"}  # 409 ConditionalRequestConflict: AWS's answer to a PUT that raced another
    bodies = [b"habla probe: writer A", b"habla probe: writer B"]
    start = threading.Barrier(2)

    def racer(body: bytes) -> str:
        start.wait(timeout=30)
        return _put_outcome(bucket, key, body, IfNoneMatch="*")

    with ThreadPoolExecutor(max_workers=2) as pool:
        first = list(pool.map(racer, bodies))
    retry = _put_outcome(bucket, key, b"habla probe: sequential retry", IfNoneMatch="*")
    stored = read_versioned(f"{storage.S3_PREFIX}{bucket}/{key}")
    winners = [body for body, outcome in zip(bodies, first) if outcome == "200"]
    if "501" in first:
        return False, False, "a PUT with If-None-Match: * answered 501 NotImplemented"
    if len(winners) > 1:
        return False, False, "two concurrent PUTs with If-None-Match: * both answered 200 OK"
    if retry not in lost:
        return False, False, f"a PUT with If-None-Match: * onto an existing key answered {retry} and overwrote it"
    if stored is None or stored.data not in (winners or bodies):  # none won: a success retried after a dropped reply
        answers = f"{'/'.join(first)}, then {retry}"
        return False, False, f"conditional PUTs answered {answers}, but the key holds another writer's body"
    # Compare-and-swap: the current ETag is accepted, a stale one refused.
    swapped = _put_outcome(bucket, key, b"habla probe: swapped", IfMatch=stored.etag)
    if swapped != "200":
        return True, False, f"a PUT with If-Match: <the current ETag> answered {swapped}"
    stale = _put_outcome(bucket, key, b"habla probe: stale writer", IfMatch=stored.etag)
    after = read_versioned(f"{storage.S3_PREFIX}{bucket}/{key}")
    if stale not in lost or after is None or after.data != b"habla probe: swapped":
        return True, False, f"a PUT with a stale If-Match ETag answered {stale} and overwrote the object"
    return True, True, f"If-None-Match: * answered {'/'.join(sorted(first))} then {retry}; stale If-Match {stale}"


def probe_conditional_writes(root: str, *, ttl: float = PROBE_TTL_SECONDS) -> StoreProbe:
    """Check, by writing, that the store under ``root`` enforces conditional creates and compare-and-swap.

    S3: first the store's release (its ``Server`` header): one known to race (:data:`RACY_STORES`) fails at once.
    Then two concurrent ``PUT``s with ``If-None-Match: *`` to a fresh probe key (one must win, the other get 412,
    409 accepted), one more sequential ``PUT`` (412), then ``If-Match`` with the current ETag (200) and with the
    stale one (412), each checked against what the key holds afterwards; the probe key is deleted. The result is
    cached per endpoint and bucket for ``ttl`` seconds. A local folder needs no probe: the OS gives the same
    guarantees (``link(2)`` refuses an existing name; a rename under an ``flock`` lock file).
    A store that answers with an error (no access, unreachable) raises HablaError; nothing is cached then.
    """
    if not storage.is_s3(root):
        detail = "a local folder: link(2) refuses an existing name; compare-and-swap renames under a lock file"
        return StoreProbe(f"local folder {root}", True, True, detail, time.monotonic())
    bucket, prefix = storage.split_s3(root)
    endpoint = storage.s3_client().meta.endpoint_url
    cached = _probes.get((endpoint, bucket))
    if cached is not None and time.monotonic() - cached.checked < ttl:
        return cached
    key = f"{prefix.strip('/') + '/' if prefix.strip('/') else ''}.habla-probe/{uuid.uuid4().hex}"
    try:
        race = known_race(_server_header(bucket))
        if race is not None:
            probe = StoreProbe(f"s3://{bucket} at {endpoint}", False, False, race, time.monotonic())
            _probes[(endpoint, bucket)] = probe
            return probe
        try:
            create, swap, detail = _probe_s3(bucket, key)
        finally:
            storage.s3_client().delete_object(Bucket=bucket, Key=key)
    except Exception as exc:  # noqa: BLE001 - botocore errors: the probe could not run, which is no verdict
        raise HablaError(f"cannot check conditional writes on s3://{bucket}: {one_line(exc, with_type=True)}") from None
    probe = StoreProbe(f"s3://{bucket} at {endpoint}", create, swap, detail, time.monotonic())
    _probes[(endpoint, bucket)] = probe
    return probe
