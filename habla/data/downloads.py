"""Resumable, verified downloads of a release archive from the Mozilla Data Collective (habla.data.mdc), into a
folder or an ``s3://`` prefix: ``habla download`` and ``habla watch --mdc``.

They resume and are verified:

* the archive grows under ``<dst>/.incoming/`` (locally one ``.part`` file; on S3 a series of complete
  segment objects, since an unfinished multipart upload cannot be read back), next to a small state file
  holding the session's ``checksum`` and ``sizeBytes``; an interrupted download continues from there with an
  HTTP ``Range`` request, on a new download session (its URL may have expired), as the SDK does with its
  ``.part`` and ``.checksum`` files. A different checksum (the dataset was updated) starts afresh;
* the session's ``checksum`` is the archive's SHA-256 (the SDK computes it so when a dataset is uploaded:
  ``upload_utils._upload_parts_and_compute_checksum``); the bytes are hashed as they arrive, exactly as sent
  (a ``Content-Encoding`` is not undone; a resumed download first re-reads what it has) and the archive is
  moved to its final name only when size and digest match. A mismatch deletes the partial download. A
  checksum that is not a SHA-256 digest cannot be checked: the download is kept and reported as unverified.

Retries and exit codes: habla.data.mdc.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from habla.core import state as records
from habla.core import storage
from habla.core.errors import Fault
from habla.data import mdc

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)


SEGMENT_BYTES = 64 * 1024 * 1024  # S3 downloads: the unit that survives an interruption (>= S3's 5 MiB part)
_SHA256 = re.compile(r"^(?:sha256:)?([0-9a-fA-F]{64})$")


@dataclass(frozen=True)
class Downloaded:
    """What :func:`fetch` did: the archive's URI, its size and SHA-256, whether the digest was checked
    against the Data Collective's, and how many bytes an earlier attempt had already fetched."""

    uri: str
    size: int
    sha256: str
    verified: bool
    resumed_from: int = 0
    already_there: bool = False


class _LocalPart:
    """A download growing in one local ``.part`` file."""

    def __init__(self, uri: str) -> None:
        self.path = Path(uri + ".part")

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def rehash(self, hasher) -> None:
        if self.path.exists():
            with open(self.path, "rb") as f:
                while chunk := f.read(mdc.CHUNK_BYTES):
                    hasher.update(chunk)

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def close(self, finished: bool) -> None:  # noqa: ARG002 - every byte written is kept
        self._file.close()

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)

    def publish(self, target: str) -> None:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, target)


class _S3Part:
    """A download growing as complete segment objects ``<uri>.parts/segment-00001`` … (readable after a
    crash, unlike the parts of an unfinished multipart upload); published by a server-side multipart copy."""

    def __init__(self, uri: str, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.prefix = uri + ".parts"
        self.segment_bytes = segment_bytes
        self._buffer = bytearray()

    def _segments(self) -> list[storage.ObjectInfo]:
        return sorted(storage.list_files(self.prefix), key=lambda i: i.uri)

    @property
    def size(self) -> int:
        return sum(i.size for i in self._segments())

    def rehash(self, hasher) -> None:
        for info in self._segments():
            hasher.update(storage.read_bytes(info.uri))

    def open(self) -> None:
        self._count = len(self._segments())
        self._buffer = bytearray()

    def _flush(self) -> None:
        if self._buffer:
            self._count += 1
            storage.write_bytes(storage.join(self.prefix, f"segment-{self._count:05d}"), bytes(self._buffer))
            self._buffer = bytearray()

    def write(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= self.segment_bytes:
            self._flush()

    def close(self, finished: bool) -> None:
        """Store the buffered bytes only when they make a whole segment or end the archive: a short segment in
        the middle would be smaller than S3's minimum multipart part (the next attempt fetches them again)."""
        if len(self._buffer) >= self.segment_bytes or finished:
            self._flush()
        self._buffer = bytearray()

    def discard(self) -> None:
        for info in self._segments():
            storage.delete(info.uri)

    def publish(self, target: str) -> None:
        segments = self._segments()
        bucket, key = storage.split_s3(target)
        client = storage.s3_client()
        if len(segments) <= 1:
            storage.copy(segments[0].uri, target) if segments else storage.write_bytes(target, b"")
        else:
            upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
            try:
                parts = []
                for number, info in enumerate(segments, start=1):
                    source_bucket, source_key = storage.split_s3(info.uri)
                    source = {"Bucket": source_bucket, "Key": source_key}
                    copied = client.upload_part_copy(
                        Bucket=bucket, Key=key, UploadId=upload, PartNumber=number, CopySource=source
                    )
                    parts.append({"PartNumber": number, "ETag": copied["CopyPartResult"]["ETag"]})
                client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload,
                                                 MultipartUpload={"Parts": parts})  # fmt: skip
            except BaseException:
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
                raise
        self.discard()


def _sha256_of(checksum: str | None) -> str | None:
    match = _SHA256.match(str(checksum or "").strip())
    return match.group(1).lower() if match else None


def _report_progress(done: int, total: int | None, started: float, last: list[float]) -> None:
    now = time.monotonic()
    if now - last[0] < 30 and (total is None or done < total):
        return
    last[0] = now
    rate = done / max(now - started, 1e-9)
    eta = f", ETA {(total - done) / rate / 60:.0f} min" if total and rate > 0 else ""
    shown = f"{done / 1e9:.2f} of {total / 1e9:.2f} GB" if total else f"{done / 1e9:.2f} GB"
    log.info("download: %s (%.1f MB/s%s)", shown, rate / 1e6, eta)


@dataclass(frozen=True)
class _Plan:
    """A download session: the archive's presigned URL (a secret: never logged, printed or stored), its size
    and checksum as announced."""

    url: str
    size: int | None
    checksum: str | None


def _plan_of(answer: dict[str, Any]) -> _Plan:
    """The download session an answer describes; a :class:`Fault` if it does not mdc.describe one."""
    url, checksum = answer.get("downloadUrl"), answer.get("checksum")
    if not isinstance(url, str) or not url:
        raise mdc.nonsense("the download session has no downloadUrl")
    if not mdc.usable_url(url):
        raise mdc.nonsense("the download session's downloadUrl is not an http(s) URL")
    if not isinstance(checksum, (str, type(None))) or len(checksum or "") > 256:
        raise mdc.nonsense("the download session's checksum is not a short string")
    return _Plan(url, mdc.byte_count(answer.get("sizeBytes"), "the download session's sizeBytes"), checksum or None)


def _archive_request(url: str, offset: int) -> requests.PreparedRequest:
    """The GET of the archive from ``offset`` on; without the key (the presigned URL carries its own)."""
    import requests

    headers = {"User-Agent": mdc.request_headers()["User-Agent"], "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return requests.Request("GET", url, headers=headers).prepare()
    except (requests.RequestException, ValueError):  # a host name IDNA cannot encode …
        raise mdc.nonsense("the download session's downloadUrl is not a usable URL") from None


_CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-[0-9]+/(?:[0-9]+|\*)")


def _body_starts_at(response: requests.Response, offset: int, where: str) -> int:
    """Where the archive's bytes in a 2xx answer start: ``offset`` for the range asked for, 0 for the whole
    archive (a server that ignores ranges); a :class:`mdc.Transient` for any other answer."""
    if response.status_code == 200:
        return 0
    found = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if response.status_code == 206 and found and int(found.group(1)) == offset:
        return offset
    raise mdc.Transient(f"HTTP {response.status_code} on {where} is not the range asked for (from byte {offset})")


def _attempt(release: mdc.MdcRelease, part, state_uri: str, session) -> tuple[str, int, str | None, int]:
    """One download session: (hex digest of all bytes so far, total size, expected SHA-256, resumed from).
    A :class:`mdc.Transient` when it stops before the end: what arrived is kept for the next attempt."""

    request = mdc.download_request(release.dataset_id)
    plan = _plan_of(mdc.read_json(mdc.send(request, session), request, "the download session"))
    state = {"checksum": plan.checksum, "size": plan.size}
    previous = records.read(state_uri, fallback="the download starts afresh")
    if previous != state:  # another version of the dataset, or no state: start afresh
        if part.size:
            log.info(
                "%s: the partial download is of another version of the archive; starting afresh", release.name.name
            )
        part.discard()
        records.write(state_uri, state)
    hasher = hashlib.sha256()
    part.rehash(hasher)
    offset, size = part.size, plan.size
    if size is not None and offset > size:
        part.discard()
        hasher, offset = hashlib.sha256(), 0
    if size is not None and offset == size:  # complete already: an earlier run stopped before publishing it
        return hasher.hexdigest(), offset, _sha256_of(plan.checksum), offset
    archive = _archive_request(plan.url, offset)
    where = mdc.describe(archive)
    try:
        response = mdc.send(archive, session, api=False)
    except mdc.Transient as exc:
        if exc.status == 416:  # the server has no byte at our offset: what we kept is not its archive
            part.discard()
        raise
    with mdc.talking_to(archive), response:
        if _body_starts_at(response, offset, where) != offset:  # the whole archive again
            part.discard()
            hasher, offset = hashlib.sha256(), 0
        resumed_from, received, overflow = offset, 0, False
        part.open()
        started, last = time.monotonic(), [time.monotonic()]
        try:
            for chunk in response.raw.stream(mdc.CHUNK_BYTES, decode_content=False):  # the bytes as sent
                if size is not None and offset + received + len(chunk) > size:
                    overflow = True
                    break
                part.write(chunk)
                hasher.update(chunk)
                received += len(chunk)
                _report_progress(offset + received, size, started, last)
        finally:
            part.close(not overflow and (size is None or offset + received == size))  # keeps what is safely stored
    if overflow:
        part.discard()
        raise mdc.Transient(f"{where} sent more than the {size} bytes announced")
    if size is not None and offset + received < size:
        raise mdc.Transient(f"the archive stopped at {offset + received} of {size} bytes ({where})")
    return hasher.hexdigest(), offset + received, _sha256_of(plan.checksum), resumed_from


def fetch(
    release: mdc.MdcRelease,
    dst: str,
    session: requests.Session | None = None,
    *,
    backoff: mdc.Backoff | None = None,
    segment_bytes: int = SEGMENT_BYTES,
) -> Downloaded:
    """Download the release's archive to ``<dst>/<release>.tar.gz`` (a folder or an ``s3://`` prefix),
    resuming an earlier partial download and checking its size and SHA-256 (see the module doc); each of
    ``backoff``'s attempts is a new download session that resumes the previous one.

    The archive appears under its final name only once complete and verified, so a watcher never sees a
    partial one. An archive already there is not fetched again.
    """
    name = f"{release.name.name}.tar.gz"
    target = storage.join(dst, name)
    if storage.exists(target):
        return Downloaded(target, _size_of(target), "", False, already_there=True)
    staging = storage.join(dst, ".incoming", name)  # a name the watcher ignores
    part = _S3Part(staging, segment_bytes) if storage.is_s3(staging) else _LocalPart(staging)
    state_uri = staging + ".json"
    session = session or mdc.new_session()
    digest, size, expected, resumed_from = mdc.retrying(
        lambda: _attempt(release, part, state_uri, session),
        backoff or mdc.BACKOFF,
        lambda cause: (
            f"download of {name} interrupted at {part.size} bytes ({cause}); run the same command again to resume"
        ),
    )
    if expected is not None and digest != expected:
        part.discard()
        storage.delete(state_uri)
        raise Fault(
            f"download of {name}: SHA-256 {digest} differs from the Data Collective's {expected}; "
            "the partial download was deleted, run again to fetch it afresh"
        )
    if expected is None:
        log.warning("%s: the Data Collective gave no SHA-256 checksum; the download is not verified", name)
    part.publish(target)
    storage.delete(state_uri)
    return Downloaded(target, size, digest, expected is not None, resumed_from)


def _size_of(uri: str) -> int:
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        return int(storage.s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    return Path(uri).stat().st_size


def download(release: mdc.MdcRelease, inbox: str, session: requests.Session | None = None) -> str:
    """Download the release's archive into the inbox as ``<release>.tar.gz`` (resumed, verified); its URI."""
    return fetch(release, inbox, session).uri
