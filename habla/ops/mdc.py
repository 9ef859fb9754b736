"""The Mozilla Data Collective (MDC), where Common Voice releases are published since October 2025.

The same REST API as the ``datacollective`` SDK (PyPI), called directly with ``requests`` so that the
watcher needs no extra dependency:

* ``GET  {api}/datasets?q=…&locale=…&task=ASR&sort=newest&sortDirection=desc&limit=100`` — the public
  catalog (no key). Common Voice releases are the datasets named ``Common Voice Scripted Speech <ver> -
  <language>``; their datasheet names the release (``cv-corpus-<ver>-<date>``).
* ``POST {api}/datasets/{id}/download`` with ``Authorization: Bearer $MDC_API_KEY`` — a download session,
  ``{"downloadUrl", "sizeBytes", "checksum"}``; the archive is then fetched from ``downloadUrl`` without the key.

``{api}`` is ``$MDC_API_URL`` or ``https://mozilladatacollective.com/api`` (the SDK's default). The key is
sent only on the download-session request and never logged: log lines show the method and URL only.

Downloads (:func:`fetch`, ``habla download``, ``habla watch --mdc``) resume and are verified:

* the archive grows under ``<dst>/.incoming/`` (locally one ``.part`` file; on S3 a series of complete
  segment objects, since an unfinished multipart upload cannot be read back), next to a small state file
  holding the session's ``checksum`` and ``sizeBytes``; an interrupted download continues from there with an
  HTTP ``Range`` request, on a new download session (its URL may have expired), as the SDK does with its
  ``.part`` and ``.checksum`` files. A different checksum (the dataset was updated) starts afresh;
* the session's ``checksum`` is the archive's SHA-256 (the SDK computes it so when a dataset is uploaded:
  ``upload_utils._upload_parts_and_compute_checksum``); the bytes are hashed as they arrive (a resumed
  download first re-reads what it has) and the archive is moved to its final name only when size and
  digest match. A mismatch deletes the partial download. A checksum that is not a SHA-256 digest cannot be
  checked: the download is kept and reported as unverified.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from habla import __version__
from habla.core import storage
from habla.core.errors import HablaError
from habla.data.commonvoice import ReleaseName, parse_release_name

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)

API_URL = "https://mozilladatacollective.com/api"
API_URL_ENV = "MDC_API_URL"
API_KEY_ENV = "MDC_API_KEY"
TIMEOUT = (10, 60)  # connect, read (seconds)
CATALOG_QUERY = "Common Voice Scripted Speech"
_TITLE = re.compile(r"Common Voice Scripted Speech (\d+(?:\.\d+)*)", re.IGNORECASE)
_CORPUS = re.compile(r"cv-corpus-(\d+(?:\.\d+)*)-(\d{4}-\d{2}-\d{2})")


@dataclass(frozen=True)
class MdcRelease:
    """A Common Voice release offered by the Data Collective."""

    name: ReleaseName
    dataset_id: str
    size_bytes: int | None = None


def api_url() -> str:
    return os.environ.get(API_URL_ENV, API_URL).rstrip("/")


def _headers() -> dict[str, str]:
    return {"User-Agent": f"habla/{__version__}", "Accept": "application/json"}


def catalog_request(locale: str) -> requests.PreparedRequest:
    """The public catalog query for Common Voice releases of ``locale``, newest first (no credentials)."""
    import requests

    params = {
        "q": CATALOG_QUERY,
        "locale": locale,
        "task": "ASR",
        "sort": "newest",
        "sortDirection": "desc",
        "limit": 100,
    }
    return requests.Request("GET", f"{api_url()}/datasets", params=params, headers=_headers()).prepare()


def download_request(dataset_id: str) -> requests.PreparedRequest:
    """The download-session request for a dataset: the one request that carries ``MDC_API_KEY``."""
    import requests

    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise HablaError(f"downloading from the Mozilla Data Collective needs an API key in {API_KEY_ENV}")
    headers = {**_headers(), "Authorization": f"Bearer {key}"}
    return requests.Request("POST", f"{api_url()}/datasets/{dataset_id}/download", headers=headers).prepare()


def describe(request: requests.PreparedRequest) -> str:
    """Method and URL of a request, for messages and logs (never its headers)."""
    return f"{request.method} {request.url}"


def _send(request: requests.PreparedRequest, session: requests.Session | None = None, *, stream: bool = False):
    import requests

    session = session or requests.Session()
    try:
        response = session.send(request, timeout=TIMEOUT, stream=stream)
    except requests.RequestException as exc:
        raise HablaError(f"Mozilla Data Collective unreachable ({describe(request)}): {type(exc).__name__}") from None
    if response.status_code >= 400:
        detail = ""
        try:
            body = response.json()
            detail = str(body.get("message") or body.get("error") or "")
        except ValueError:
            pass
        hint = f" (check {API_KEY_ENV})" if response.status_code in (401, 403) else ""
        raise HablaError(
            f"Mozilla Data Collective: HTTP {response.status_code} on {describe(request)}{hint}"
            + (f": {detail}" if detail else "")
        )
    return response


def releases_in(catalog: dict[str, Any], locale: str) -> list[MdcRelease]:
    """The full Common Voice releases of ``locale`` in a catalog page (deltas and other datasets left out)."""
    out = []
    for item in catalog.get("items") or []:
        title = str(item.get("name") or "")
        if str(item.get("locale") or "").lower() != locale.lower() or "delta" in title.lower():
            continue
        parsed = parse_release_name(str(item.get("filename") or ""))
        if parsed is None:
            title_match = _TITLE.search(title)
            if not title_match:
                continue
            text = " ".join(str(item.get(k) or "") for k in ("filename", "shortDescription", "longDescription"))
            corpus = _CORPUS.search(text)
            date = corpus.group(2) if corpus else str(item.get("createdAt") or "")[:10]
            parsed = parse_release_name(f"cv-corpus-{title_match.group(1)}-{date}-{locale}.tar.gz")
        if parsed is not None and not parsed.delta and item.get("id"):
            out.append(MdcRelease(parsed, str(item["id"]), item.get("sizeBytes")))
    return sorted(out, key=lambda r: r.name)


def newest_release(locale: str, session: requests.Session | None = None) -> MdcRelease | None:
    """The newest full Common Voice release of ``locale`` that the Data Collective lists."""
    found = _listed_releases(locale, session)
    return found[-1] if found else None


def _listed_releases(locale: str, session: requests.Session | None) -> list[MdcRelease]:
    """The full releases of ``locale`` in the Data Collective's catalog, oldest first."""
    response = _send(catalog_request(locale), session)
    try:
        catalog = response.json()
    except ValueError:
        raise HablaError("Mozilla Data Collective: the catalog answer is not JSON") from None
    return releases_in(catalog, locale)


SEGMENT_BYTES = 64 * 1024 * 1024  # S3 downloads: the unit that survives an interruption (>= S3's 5 MiB part)
CHUNK_BYTES = 1 << 16  # what arrives before a dropped connection is kept, to this granularity
ATTEMPTS = 3  # download sessions tried by one fetch before giving up (each resumes the previous one)
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
                while chunk := f.read(CHUNK_BYTES):
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
    import time

    now = time.monotonic()
    if now - last[0] < 30 and (total is None or done < total):
        return
    last[0] = now
    rate = done / max(now - started, 1e-9)
    eta = f", ETA {(total - done) / rate / 60:.0f} min" if total and rate > 0 else ""
    shown = f"{done / 1e9:.2f} of {total / 1e9:.2f} GB" if total else f"{done / 1e9:.2f} GB"
    log.info("download: %s (%.1f MB/s%s)", shown, rate / 1e6, eta)


def _attempt(release: MdcRelease, part, state_uri: str, session) -> tuple[str, int, str | None, int]:
    """One download session: (hex digest of all bytes so far, total size, expected SHA-256, resumed from)."""
    import hashlib
    import time

    import requests

    plan = _send(download_request(release.dataset_id), session).json()
    url, size, checksum = plan.get("downloadUrl"), plan.get("sizeBytes"), plan.get("checksum")
    if not url:
        raise HablaError("Mozilla Data Collective: the download session has no downloadUrl")
    size = int(size) if size else None
    state = {"checksum": checksum, "size": size}
    try:
        previous = json.loads(storage.read_text(state_uri))
    except FileNotFoundError:
        previous = None
    if previous != state:  # another version of the dataset, or no state: start afresh
        if part.size:
            log.info(
                "%s: the partial download is of another version of the archive; starting afresh", release.name.name
            )
        part.discard()
        storage.write_text(state_uri, json.dumps(state))
    hasher = hashlib.sha256()
    part.rehash(hasher)
    offset = part.size
    if size is not None and offset > size:
        part.discard()
        hasher, offset = hashlib.sha256(), 0
    if size is not None and offset == size:  # complete already: an earlier run stopped before publishing it
        return hasher.hexdigest(), offset, _sha256_of(checksum), offset
    headers = {"User-Agent": _headers()["User-Agent"]}  # the presigned URL carries its own authorization
    if offset:
        headers["Range"] = f"bytes={offset}-"
    fetch = requests.Request("GET", url, headers=headers).prepare()
    resumed_from = offset
    with _send(fetch, session, stream=True) as response:
        if offset and response.status_code != 206:  # the server ignored the range: it sends everything again
            part.discard()
            hasher, offset, resumed_from = hashlib.sha256(), 0, 0
        response.raw.decode_content = False  # keep the archive's bytes as they are
        part.open()
        started, last, received, finished = time.monotonic(), [time.monotonic()], 0, False
        try:
            for chunk in response.iter_content(chunk_size=CHUNK_BYTES):
                part.write(chunk)
                hasher.update(chunk)
                received += len(chunk)
                _report_progress(offset + received, size, started, last)
            finished = size is None or offset + received == size
        finally:
            part.close(finished)  # keeps what is safely stored: the next attempt resumes from there
    if size is not None and offset + received < size:  # the server closed the stream early
        raise requests.ConnectionError(f"stream ended at {offset + received} of {size} bytes")
    return hasher.hexdigest(), offset + received, _sha256_of(checksum), resumed_from


def fetch(
    release: MdcRelease,
    dst: str,
    session: requests.Session | None = None,
    attempts: int = ATTEMPTS,
    segment_bytes: int = SEGMENT_BYTES,
) -> Downloaded:
    """Download the release's archive to ``<dst>/<release>.tar.gz`` (a folder or an ``s3://`` prefix),
    resuming an earlier partial download and checking its size and SHA-256 (see the module doc).

    The archive appears under its final name only once complete and verified, so a watcher never sees a
    partial one. An archive already there is not fetched again.
    """
    import requests

    name = f"{release.name.name}.tar.gz"
    target = storage.join(dst, name)
    if storage.exists(target):
        return Downloaded(target, _size_of(target), "", False, already_there=True)
    staging = storage.join(dst, ".incoming", name)  # a name the watcher ignores
    part = _S3Part(staging, segment_bytes) if storage.is_s3(staging) else _LocalPart(staging)
    state_uri = staging + ".json"
    session = session or requests.Session()
    for attempt in range(1, attempts + 1):
        try:
            digest, size, expected, resumed_from = _attempt(release, part, state_uri, session)
            break
        except requests.RequestException as exc:  # dropped connection, read timeout: resume on a new session
            log.warning("%s: download interrupted at %d bytes (%s), attempt %d of %d",
                        name, part.size, type(exc).__name__, attempt, attempts)  # fmt: skip
            if attempt == attempts:
                raise ConnectionError(
                    f"download of {name} interrupted at {part.size} bytes after {attempts} attempts; "
                    "run the same command again to resume"
                ) from None
    announced = json.loads(storage.read_text(state_uri)).get("size")
    if announced is not None and size != int(announced):
        raise ConnectionError(f"download of {name} stopped at {size} of {announced} bytes; run again to resume")
    if expected is not None and digest != expected:
        part.discard()
        storage.delete(state_uri)
        raise HablaError(
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


def download(release: MdcRelease, inbox: str, session: requests.Session | None = None) -> str:
    """Download the release's archive into the inbox as ``<release>.tar.gz`` (resumed, verified); its URI."""
    return fetch(release, inbox, session).uri


def find_release(locale: str, version: str | None = None, session: requests.Session | None = None) -> MdcRelease:
    """The newest full release of ``locale`` the Data Collective lists, or the one of ``version`` (``25.0``)."""
    listed = _listed_releases(locale, session)
    found = listed
    if version is not None:
        wanted = tuple(int(p) for p in version.split("."))
        found = [r for r in listed if r.name.version == wanted]
    if not found:
        names = ", ".join(r.name.version_str for r in listed) or "none"
        raise HablaError(
            f"the Data Collective lists no Common Voice release {version or ''} for {locale!r} (listed: {names})"
        )
    return found[-1]
