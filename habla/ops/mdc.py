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
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from habla import __version__
from habla.core import storage
from habla.core.errors import HablaError, one_line
from habla.data.commonvoice import ReleaseName, parse_release_name

if TYPE_CHECKING:
    import requests

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
    response = _send(catalog_request(locale), session)
    try:
        catalog = response.json()
    except ValueError:
        raise HablaError("Mozilla Data Collective: the catalog answer is not JSON") from None
    found = releases_in(catalog, locale)
    return found[-1] if found else None


class _Counting:
    """A read-only stream that counts the bytes read (to check the download's size)."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.count = raw, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        return data


def download(release: MdcRelease, inbox: str, session: requests.Session | None = None) -> str:
    """Download the release's archive into the inbox as ``<release>.tar.gz``, atomically; its URI.

    The archive is streamed (tens of GB) to ``<inbox>/.incoming/`` (S3: a multipart upload) and moved to its
    final name only when complete, so a watcher never sees a partial archive. A short download is an error.
    """
    import requests

    session = session or requests.Session()
    plan = _send(download_request(release.dataset_id), session).json()
    url, size = plan.get("downloadUrl"), plan.get("sizeBytes")
    if not url:
        raise HablaError("Mozilla Data Collective: the download session has no downloadUrl")
    # The presigned URL carries its own authorization: do not send the API key along.
    fetch = requests.Request("GET", url, headers={"User-Agent": _headers()["User-Agent"]}).prepare()
    target = storage.join(inbox, f"{release.name.name}.tar.gz")
    # Downloaded under .incoming/ (a name the watcher ignores), moved into place once complete.
    staging = storage.join(inbox, ".incoming", f"{release.name.name}.tar.gz")
    try:
        with _send(fetch, session, stream=True) as response:
            response.raw.decode_content = False  # keep the archive's bytes as they are
            body = _Counting(response.raw)
            if storage.is_s3(staging):
                bucket, key = storage.split_s3(staging)
                storage.s3_client().upload_fileobj(body, bucket, key)
            else:
                Path(staging).parent.mkdir(parents=True, exist_ok=True)
                with open(staging, "wb") as f:
                    while chunk := body.read(1 << 20):
                        f.write(chunk)
    except HablaError:
        raise
    except Exception as exc:  # noqa: BLE001 - a dropped connection, a failed upload: leave no half-written file
        storage.delete(staging)
        raise HablaError(f"download of {release.name.name} failed: {one_line(exc, with_type=True)}") from None
    if size and body.count != int(size):
        storage.delete(staging)
        raise HablaError(f"download of {release.name.name} stopped at {body.count} of {size} bytes")
    if storage.is_s3(target):
        storage.copy(staging, target)
        storage.delete(staging)
    else:
        os.replace(staging, target)
    return target
