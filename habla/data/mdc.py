"""The Mozilla Data Collective (MDC), where Common Voice releases are published since October 2025.

The same REST API as the ``datacollective`` SDK (PyPI), called directly with ``requests`` so that the
watcher needs no extra dependency:

* ``GET  {api}/datasets?q=…&locale=…&task=ASR&sort=newest&sortDirection=desc&limit=100`` — the public
  catalog (no key). Common Voice releases are the datasets named ``Common Voice Scripted Speech <ver> -
  <language>``; their datasheet names the release (``cv-corpus-<ver>-<date>``).
* ``POST {api}/datasets/{id}/download`` with ``Authorization: Bearer $MDC_API_KEY`` — a download session,
  ``{"downloadUrl", "sizeBytes", "checksum"}``; the archive is then fetched from ``downloadUrl`` without the key.

``{api}`` is ``$MDC_API_URL`` or ``https://mozilladatacollective.com/api`` (the SDK's default). The key is
sent only on the download-session request. Neither the key nor the presigned ``downloadUrl`` (its query
string is the signature) is ever logged, printed or stored: messages name a request by its method, host and
path only (:func:`describe`), text the server sends back is shown without the key, and the state files hold
the checksum and size, never the URL.

Downloads are habla.data.downloads'.

Failures, retries and exit codes (``habla download``; ``habla watch --mdc`` turns each into one ``failed``
decision and tries again on its next poll):

* **retried** with exponential backoff (:class:`Backoff`: 4 tries, waiting 2, 4, 8 s; a ``Retry-After`` is
  honoured up to 60 s): HTTP 5xx, 429 and 408 and a dropped, refused or timed-out connection on any request,
  and on the archive's URL also any 4xx (an expired presigned URL: the next try opens a new session) and a
  stream that ends early, sends more than announced or answers another range than asked. Each try of the
  download resumes from what the earlier ones kept;
* **exit 1** (:class:`~habla.core.errors.Fault`, one line): still failing after the last try; a redirect
  loop; an answer that makes no sense (not JSON, not an object, ``items`` not a list, an item with a missing
  or mistyped field, a session without ``downloadUrl`` or with a ``sizeBytes`` that is not a number, a body
  over 16 MiB, a 1xx/3xx final status); an archive whose SHA-256 differs from the announced one;
* **exit 2** (:class:`~habla.core.errors.HablaError`, one line): the API refused the request (HTTP 4xx: a
  missing or wrong ``MDC_API_KEY``, dataset terms not accepted, a wrong ``MDC_API_URL``), an unusable
  ``MDC_API_URL``, locale or version (``25.0``), a version the catalog does not list.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from habla import __version__
from habla.core.errors import Fault, HablaError, redact
from habla.speech.releases import ReleaseName, parse_release_name

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)
T = TypeVar("T")

API_URL = "https://mozilladatacollective.com/api"
API_URL_ENV = "MDC_API_URL"
API_KEY_ENV = "MDC_API_KEY"
TIMEOUT = (10, 60)  # connect, read (seconds): the longest wait for a connection or for the next bytes
MAX_REDIRECTS = 10  # more is a redirect loop
MAX_ANSWER_BYTES = 16 * 1024 * 1024  # a catalog page or a download session; a larger answer is nonsense
MESSAGE_BYTES = 4096  # read of an error answer, for its message
CHUNK_BYTES = 1 << 16  # what arrives before a dropped connection is kept, to this granularity
CATALOG_QUERY = "Common Voice Scripted Speech"
_TITLE = re.compile(r"Common Voice Scripted Speech (\d+(?:\.\d+)*)", re.IGNORECASE)
_CORPUS = re.compile(r"cv-corpus-(\d+(?:\.\d+)*)-(\d{4}-\d{2}-\d{2})")
_VERSION = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9}){0,4}")
_LOCALE = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8}){0,3}")  # as in a release name (habla.speech.releases)
_DATASET_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # a URL path segment: no '/', '?', '%'; not '..'
_PATH_QUERY = re.compile(r"(/[^\s?]*)\?\S+")  # a path's query string, in text a server sends (redact() sees URLs)
_URL_CHARACTERS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: what http.client will send


@dataclass(frozen=True)
class MdcRelease:
    """A Common Voice release offered by the Data Collective."""

    name: ReleaseName
    dataset_id: str
    size_bytes: int | None = None


@dataclass(frozen=True)
class Backoff:
    """How a request that failed for a passing reason is tried again: ``attempts`` tries in all, waiting
    ``first`` seconds after the first, twice as long after each next one, never more than ``longest``; a
    server's ``Retry-After`` replaces the wait, up to ``longest``. ``sleep`` is there for tests not to wait."""

    attempts: int = 4
    first: float = 2.0
    longest: float = 60.0
    sleep: Callable[[float], None] = time.sleep

    def wait(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed try number ``attempt`` (1, 2 …)."""
        if retry_after is not None:
            return min(retry_after, self.longest)
        return min(self.first * 2 ** (attempt - 1), self.longest)


BACKOFF = Backoff()  # what every call uses unless given another


class Transient(Exception):
    """A failure worth another try (HTTP 5xx/429/408, a dropped or timed-out connection, a stream cut short)."""

    def __init__(self, message: str, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after, self.status = retry_after, status


def nonsense(what: str) -> Fault:
    """The service answered something habla cannot use: its fault (exit 1), not the user's input."""
    return Fault(f"Mozilla Data Collective answered nonsense: {what}")


def usable_url(url: str) -> bool:
    """An absolute http(s) URL with a host, of characters that can be sent as they are."""
    if not _URL_CHARACTERS.fullmatch(url):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def api_url() -> str:
    url = os.environ.get(API_URL_ENV, API_URL).strip().rstrip("/")
    if not usable_url(url):
        raise HablaError(f"{API_URL_ENV} is not an http(s) URL: {redact(url)[:100]!r}")
    return url


def request_headers() -> dict[str, str]:
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
    return requests.Request("GET", f"{api_url()}/datasets", params=params, headers=request_headers()).prepare()


def download_request(dataset_id: str) -> requests.PreparedRequest:
    """The download-session request for a dataset: the one request that carries ``MDC_API_KEY``."""
    import requests

    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise HablaError(f"downloading from the Mozilla Data Collective needs an API key in {API_KEY_ENV}")
    headers = {**request_headers(), "Authorization": f"Bearer {key}"}
    return requests.Request("POST", f"{api_url()}/datasets/{dataset_id}/download", headers=headers).prepare()


def describe(request: requests.PreparedRequest) -> str:
    """Method, host and path of a request, for messages and logs: never its query string (a presigned URL's
    signature), user info or headers (the key)."""
    parts = urlsplit(request.url or "")
    return f"{request.method} {parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def new_session() -> requests.Session:
    import requests

    session = requests.Session()
    session.max_redirects = MAX_REDIRECTS
    return session


@contextlib.contextmanager
def talking_to(request: requests.PreparedRequest) -> Iterator[None]:
    """Turn what ``requests`` raises while sending ``request`` or reading its answer into a :class:`Transient`
    (worth another try) or a :class:`Fault`; never with the exception's text, which holds the whole URL."""
    import http.client

    import requests
    import urllib3

    where = describe(request)
    passing = (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,
        requests.exceptions.ContentDecodingError,
        urllib3.exceptions.HTTPError,
        http.client.HTTPException,
    )
    try:
        yield
    except requests.TooManyRedirects:
        raise Fault(f"Mozilla Data Collective: a redirect loop (over {MAX_REDIRECTS} redirects) on {where}") from None
    except passing as exc:
        raise Transient(f"{type(exc).__name__} on {where}") from None
    except requests.RequestException as exc:  # a redirect to something that is not an http(s) URL …
        raise nonsense(f"{type(exc).__name__} on {where}") from None


def send(request: requests.PreparedRequest, session: requests.Session, *, api: bool = True) -> requests.Response:
    """The answer to ``request``, its body not read yet, if its status is 2xx (redirects followed).

    Other statuses: 5xx, 429 and 408 are passing (:class:`Transient`); a 4xx from the API is the user's to fix
    (HablaError: the key, the terms, the URL); a 4xx from the archive's presigned URL is passing (the next try
    opens a new session, with a new URL); anything else is nonsense.
    """
    with talking_to(request):
        response = session.send(request, timeout=TIMEOUT, stream=True, allow_redirects=True)
    status, where = response.status_code, describe(request)
    if 200 <= status < 300:
        return response
    with response:
        if status in (408, 429) or status >= 500 or (400 <= status < 500 and not api):
            raise Transient(f"HTTP {status} on {where}", _retry_after(response), status)
        if 400 <= status < 500:
            hint = f" (check {API_KEY_ENV} and that you accepted the dataset's terms)" if status in (401, 403) else ""
            message = _server_message(response)
            detail = f": {message}" if message else ""
            raise HablaError(f"Mozilla Data Collective: HTTP {status} on {where}{hint}{detail}")
        raise nonsense(f"HTTP {status} on {where}")


def _retry_after(response: requests.Response) -> float | None:
    """The seconds a ``Retry-After`` header asks to wait (a number or an HTTP date); None if absent or unreadable."""
    value = (response.headers.get("Retry-After") or "").strip()
    if re.fullmatch(r"[0-9]{1,9}", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())


def _server_message(response: requests.Response) -> str:
    """The ``message`` of the API's JSON error answer as one short line without the key or URL secrets, or ''."""
    try:
        body = json.loads(response.raw.read(MESSAGE_BYTES, decode_content=True))
        message = (body.get("message") or body.get("error")) if isinstance(body, dict) else None
    except Exception:  # a courtesy only: an error answer that cannot be read says nothing
        return ""
    text = _PATH_QUERY.sub(r"\1?…", " ".join(str(message or "").split()))
    key = os.environ.get(API_KEY_ENV, "").strip()
    return redact(text.replace(key, "…") if key else text)[:200]


def read_json(response: requests.Response, request: requests.PreparedRequest, what: str) -> dict[str, Any]:
    """The JSON object a 2xx answer holds; a :class:`Fault` if it holds anything else."""
    body = bytearray()
    with talking_to(request), response:
        for chunk in response.iter_content(chunk_size=CHUNK_BYTES):
            body += chunk
            if len(body) > MAX_ANSWER_BYTES:
                raise nonsense(f"{what} is over {MAX_ANSWER_BYTES} bytes ({describe(request)})")
    try:
        value = json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise nonsense(f"{what} is not JSON ({describe(request)})") from None
    if not isinstance(value, dict):
        raise nonsense(f"{what} is not a JSON object ({describe(request)})")
    return value


def retrying(call: Callable[[], T], backoff: Backoff, give_up: Callable[[str], str]) -> T:
    """``call()``, tried again after each passing failure as ``backoff`` says; after the last, a :class:`Fault`
    with the line ``give_up(cause)``. Any other error ends the tries at once."""
    attempt = 1
    while True:
        try:
            return call()
        except Transient as exc:
            if attempt >= backoff.attempts:
                raise Fault(give_up(f"{exc}, {attempt} attempt{'s' * (attempt > 1)}")) from None
            wait = backoff.wait(attempt, exc.retry_after)
            log.warning("Mozilla Data Collective: %s (attempt %d of %d); trying again in %.0f s",
                        exc, attempt, backoff.attempts, wait)  # fmt: skip
            backoff.sleep(wait)
            attempt += 1


def byte_count(value: Any, what: str) -> int | None:
    """A size the service sends (a number or a string of digits, as JSON APIs send big integers), or None."""
    if value is None:
        return None
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,19}", value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise nonsense(f"{what} is not a number of bytes")


def _check_item(item: Any, number: int) -> None:
    """A :class:`Fault` unless a catalog item has the fields habla reads, each of its type (``sizeBytes``:
    :func:`byte_count`)."""
    if not isinstance(item, dict):
        raise nonsense(f"catalog item {number} is not an object")
    for field in ("name", "locale"):
        if not isinstance(item.get(field), str):
            raise nonsense(f"catalog item {number} has no {field} (a string)")
    for field in ("filename", "shortDescription", "longDescription", "createdAt"):
        if not isinstance(item.get(field), (str, type(None))):
            raise nonsense(f"catalog item {number}'s {field} is not a string")
    dataset_id = item.get("id")
    if (
        isinstance(dataset_id, bool)
        or not isinstance(dataset_id, (str, int))
        or not _DATASET_ID.fullmatch(str(dataset_id))
    ):
        raise nonsense(f"catalog item {number} has no usable id")


def _parsed(text: str) -> ReleaseName | None:
    try:
        return parse_release_name(text)
    except ValueError:  # a version number too long for int()
        return None


def _release_name(item: dict[str, Any], locale: str) -> ReleaseName | None:
    """The full release of ``locale`` a (checked) catalog item offers, from its file name or else its title
    and datasheet; None for other datasets, other locales and deltas."""
    title = item["name"]
    if item["locale"].lower() != locale.lower() or "delta" in title.lower():
        return None
    parsed = _parsed(item.get("filename") or "")
    if parsed is None:
        title_match = _TITLE.search(title)
        if not title_match:
            return None
        text = " ".join(item.get(k) or "" for k in ("filename", "shortDescription", "longDescription"))
        corpus = _CORPUS.search(text)
        date = corpus.group(2) if corpus else (item.get("createdAt") or "")[:10]
        parsed = _parsed(f"cv-corpus-{title_match.group(1)}-{date}-{locale}.tar.gz")
    if parsed is None or parsed.delta or parsed.locale.lower() not in ("", locale.lower()):
        return None
    return replace(parsed, locale=parsed.locale or locale)  # the locale: the file's own name


def releases_in(catalog: dict[str, Any], locale: str) -> list[MdcRelease]:
    """The full Common Voice releases of ``locale`` in a catalog page (deltas and other datasets left out); a
    :class:`Fault` if the page is not what the API documents."""
    items = catalog.get("items") if isinstance(catalog, dict) else None
    if not isinstance(items, list):
        raise nonsense("the catalog's items is not a list")
    out = []
    for number, item in enumerate(items, start=1):
        _check_item(item, number)
        size = byte_count(item.get("sizeBytes"), f"catalog item {number}'s sizeBytes")
        name = _release_name(item, locale)
        if name is not None:
            out.append(MdcRelease(name, str(item["id"]), size))
    return sorted(out, key=lambda r: r.name)


def newest_release(
    locale: str, session: requests.Session | None = None, backoff: Backoff | None = None
) -> MdcRelease | None:
    """The newest full Common Voice release of ``locale`` that the Data Collective lists."""
    found = _listed_releases(locale, session, backoff)
    return found[-1] if found else None


def _listed_releases(locale: str, session: requests.Session | None, backoff: Backoff | None) -> list[MdcRelease]:
    """The full releases of ``locale`` in the Data Collective's catalog, oldest first."""
    if not _LOCALE.fullmatch(locale):
        raise HablaError(f"locale {locale[:40]!r} is not a Common Voice locale such as es or pt-BR")
    session = session or new_session()

    def ask() -> dict[str, Any]:
        request = catalog_request(locale)
        return read_json(send(request, session), request, "the catalog")

    catalog = retrying(ask, backoff or BACKOFF, lambda cause: f"Mozilla Data Collective: {cause}; try again later")
    return releases_in(catalog, locale)


def _version(text: str) -> tuple[int, ...]:
    """A version as compared: ``25``, ``25.0`` and ``25.0.0`` are one version."""
    parts = [int(p) for p in text.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def find_release(
    locale: str,
    version: str | None = None,
    session: requests.Session | None = None,
    backoff: Backoff | None = None,
) -> MdcRelease:
    """The newest full release of ``locale`` the Data Collective lists, or the one of ``version`` (``25.0``)."""
    if version is not None and not _VERSION.fullmatch(version):
        raise HablaError(f"release version {version[:40]!r} is not a version such as 25.0")
    listed = _listed_releases(locale, session, backoff)
    found = [r for r in listed if version is None or _version(r.name.version_str) == _version(version)]
    if not found:
        names = ", ".join(dict.fromkeys(r.name.version_str for r in listed[-10:])) or "none"
        raise HablaError(
            f"the Data Collective lists no Common Voice release {version or ''} for {locale!r} (listed: {names})"
        )
    return found[-1]
