"""A stand-in of the Mozilla Data Collective's download API on loopback, for download tests; it misbehaves on
demand.

What it serves, and how it was checked against the ``datacollective`` SDK (PyPI, version 0.7.0; read, not
copied):

* ``GET /api/datasets?…``: the public catalog, ``{"items": [...], "total": n}`` (habla.data.mdc reads
  ``id``, ``name``, ``locale``, ``shortDescription``).
* ``POST /api/datasets/<id>/download`` with ``Authorization: Bearer <key>``: a download session
  ``{"downloadUrl", "sizeBytes", "checksum"}``, the three fields the SDK's ``_build_download_plan`` reads. The
  checksum is the archive's SHA-256 hex digest, which is what the SDK computes and sends when a dataset is
  uploaded (``upload_utils._upload_parts_and_compute_checksum``). Each session gets a new URL, presigned as
  S3 does it: its query string carries :data:`SIGNATURE`, which habla must never print, log or store.
* ``GET /files/<session>/<id>.tar.gz?X-Amz-Signature=…``: the archive, without the key (the SDK sends none:
  ``include_auth_headers=False``); 403 without the signature. ``Range: bytes=N-`` is answered with ``206
  Partial Content`` and a ``Content-Range`` header, as S3/CloudFront presigned URLs do and as the SDK's resume
  relies on.

Faults to inject: ``drops`` (byte offsets of the archive at which the next archive responses stop, one per
response), ``ignore_range`` (answer a range request with the whole archive, 200), ``checksum`` (announce
another digest), and ``misbehave``: one :class:`Misbehaviour` per request, whatever the request, in order (a
``None`` answers that request right). ``served`` records what each misbehaving answer did wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

KEY = "mdc-test-key-not-a-secret"
SIGNATURE = "standin-signature-5f3c9a1e7b2d"  # the secret part of every presigned URL the stand-in hands out


@dataclass(frozen=True)
class Misbehaviour:
    """What the stand-in does instead of the right answer to one request (the catalog, a download session or
    the archive)."""

    delay: float = 0.0  # wait this long first
    hangup: bool = False  # then close the connection without an answer
    redirects: int = 0  # answer 307 to the same URL this many times first; -1: for ever (a redirect loop)
    status: int | None = None  # answer this status, with a JSON message
    retry_after: str | None = None  # … and this Retry-After header
    body: str | None = None  # a wrong body of the right status: a name in BODIES (ignored where it does not fit)
    stop_at: int | None = None  # hang up after this many bytes of the body (its Content-Length is the whole)


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


# Wrong bodies, per endpoint: each makes one from the right one (a dict for JSON answers, bytes for the archive).
_ANY_JSON = {
    "not-json": lambda right, s: b"<html><body>502 Bad Gateway</body></html>",
    "truncated": lambda right, s: _half(json.dumps(right).encode()),
    "array": lambda right, s: b"[]",
    "deep": lambda right, s: b"[" * 100_000 + b"]" * 100_000,  # deeper than any JSON parser's recursion
    "huge": lambda right, s: b" " * (17 * 1024 * 1024) + json.dumps(right).encode(),  # valid, but over 16 MiB
}
BODIES = {
    "catalog": {
        **_ANY_JSON,
        "items-not-list": lambda right, s: {"items": {"0": right["items"][0]}, "total": 1},
        "item-not-object": lambda right, s: {"items": ["es25"], "total": 1},
        "wrong-types": lambda right, s: {"items": [{**right["items"][0], "name": 25, "locale": ["es"]}]},
        "missing-fields": lambda right, s: {"items": [{"name": right["items"][0]["name"]}], "total": 1},
        "bad-id": lambda right, s: {"items": [{**right["items"][0], "id": "../../admin?x=1"}], "total": 1},
        "size-not-numeric": lambda right, s: {"items": [{**right["items"][0], "sizeBytes": "3 MB"}], "total": 1},
    },
    "session": {
        **_ANY_JSON,
        "no-url": lambda right, s: {k: v for k, v in right.items() if k != "downloadUrl"},
        "url-not-http": lambda right, s: {**right, "downloadUrl": "file:///etc/passwd"},
        "size-not-numeric": lambda right, s: {**right, "sizeBytes": "3 MB"},
        "wrong-types": lambda right, s: {"downloadUrl": 5, "sizeBytes": [1], "checksum": {}},
        "missing-fields": lambda right, s: {},
        "wrong-checksum": lambda right, s: {**right, "checksum": hashlib.sha256(b"another archive").hexdigest()},
        "size-wrong": lambda right, s: {**right, "sizeBytes": right["sizeBytes"] + 1000},
    },
    "archive": {
        "truncated": lambda right, s: _half(right),
        "corrupt": lambda right, s: bytes([right[0] ^ 0xFF]) + right[1:] if right else b"x",
        "longer": lambda right, s: right + b"trailing junk",
        "not-json": lambda right, s: b"<html><body>an error page, served as 200</body></html>",
        "content-encoding": lambda right, s: right,  # the same bytes, said to be gzip: to be kept as they are
    },
}
HARMLESS = ("delay", "redirect", "body:content-encoding")  # what a client must survive without a failure


def leaks(*texts: str, folder: Path | None = None) -> list[str]:
    """Where the API key or a presigned URL's signature shows: in ``texts`` (their index) or in the name or
    content of a file under ``folder``."""
    found = [f"text {i}" for i, text in enumerate(texts) if KEY in text or SIGNATURE in text]
    for path in sorted(folder.rglob("*")) if folder is not None else []:
        content = path.read_bytes() if path.is_file() else b""
        if any(secret in str(path) or secret.encode() in content for secret in (KEY, SIGNATURE)):
            found.append(str(path))
    return found


class MdcStandin(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, archive: bytes, dataset_id: str = "es25", corpus: str = "cv-corpus-25.0-2026-03-09") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.archive = archive
        self.dataset_id, self.corpus = dataset_id, corpus
        self.title = "Common Voice Scripted Speech 25.0 - Spanish"
        self.checksum = hashlib.sha256(archive).hexdigest()
        self.drops: list[int] = []
        self.ignore_range = False
        self.misbehave: list[Misbehaviour | None] = []
        self.served: list[tuple[str, list[str]]] = []  # (endpoint, what its answer did wrong) per misbehaving answer
        self.sessions = 0
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers)
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)  # quick to stop

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def ranges(self) -> list[str | None]:
        """The Range header of every archive request, in order."""
        return [h.get("Range") for m, p, h in self.requests if m == "GET" and p.startswith("/files/")]

    def reset(self) -> None:
        """Behave from now on, and forget what was asked and served."""
        with self.lock:
            self.drops, self.misbehave, self.served, self.requests = [], [], [], []
            self.ignore_range, self.checksum = False, hashlib.sha256(self.archive).hexdigest()

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up mid-answer is what the tests do on purpose: no traceback on stderr."""

    def __enter__(self) -> MdcStandin:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: MdcStandin

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _endpoint(self, method: str, path: str) -> str:
        s = self.server
        if method == "GET" and path == "/api/datasets":
            return "catalog"
        if method == "POST" and path == f"/api/datasets/{s.dataset_id}/download":
            return "session"
        if method == "GET" and path.startswith("/files/") and path.endswith(f"/{s.dataset_id}.tar.gz"):
            return "archive"
        return "unknown"

    def _handle(self, method: str) -> None:
        s = self.server
        endpoint = self._endpoint(method, urlsplit(self.path).path)
        with s.lock:
            s.requests.append((method, self.path, dict(self.headers)))
            trouble = s.misbehave.pop(0) if s.misbehave else None
            if endpoint == "session":
                s.sessions += 1
            session = s.sessions
        if trouble is None:
            return self._right(endpoint, session, None, None)
        done: list[str] = []  # filled before each answer goes out: the client may act on it at once
        with s.lock:
            s.served.append((endpoint, done))
        self._misbehave(trouble, endpoint, session, done)

    def _misbehave(self, trouble: Misbehaviour, endpoint: str, session: int, done: list[str]) -> None:
        """Answer as ``trouble`` says, first noting in ``done`` what the answer does wrong."""
        s = self.server
        if trouble.delay:
            done.append("delay")
            time.sleep(trouble.delay)
        if trouble.hangup:
            done.append("hangup")
            self.close_connection = True
            return
        if trouble.redirects:
            done.append("redirect-loop" if trouble.redirects < 0 else "redirect")
            rest = dataclasses.replace(trouble, delay=0.0, redirects=max(trouble.redirects - 1, -1))
            with s.lock:  # the rest of the misbehaviour (if any) answers the redirected request
                s.misbehave.insert(0, rest if rest != Misbehaviour() else None)
            return self._send(307, b"", {"Location": f"{s.url}{self.path}"})
        if trouble.status is not None:
            done.append(f"status:{trouble.status}")
            headers = {"Retry-After": trouble.retry_after} if trouble.retry_after is not None else {}
            echo = f"misbehaving on purpose on {self.command} {self.path} for {self.headers.get('Authorization')}"
            return self._json(trouble.status, {"message": echo}, trouble.stop_at, headers)  # secrets echoed, as some do
        fits = trouble.body in BODIES.get(endpoint, {})
        done += [f"body:{trouble.body}"] * fits + ["stop"] * (trouble.stop_at is not None)
        self._right(endpoint, session, trouble.body if fits else None, trouble.stop_at)

    def _right(self, endpoint: str, session: int, wrong: str | None, stop_at: int | None) -> None:
        """The right answer to a request, or the ``wrong`` body of BODIES in its place."""
        s = self.server
        mutate = BODIES.get(endpoint, {}).get(wrong or "", lambda right, s: right)
        if endpoint == "catalog":
            item = {"id": s.dataset_id, "name": s.title, "locale": "es", "shortDescription": s.corpus,
                    "sizeBytes": len(s.archive)}  # fmt: skip
            return self._json(200, mutate({"items": [item], "total": 1}, s), stop_at)
        if endpoint == "session":
            if self.headers.get("Authorization") != f"Bearer {KEY}":
                return self._json(401, {"message": "invalid API key"})
            url = (
                f"{s.url}/files/session-{session}/{s.dataset_id}.tar.gz?X-Amz-Expires=3600&X-Amz-Signature={SIGNATURE}"
            )
            return self._json(200, mutate({"downloadUrl": url, "sizeBytes": len(s.archive), "checksum": s.checksum}, s),
                              stop_at)  # fmt: skip
        if endpoint == "archive":
            if f"X-Amz-Signature={SIGNATURE}" not in self.path:
                return self._json(403, {"message": "SignatureDoesNotMatch"})
            return self._archive(mutate(s.archive, s), wrong == "content-encoding", stop_at)
        self._json(404, {"message": "not found"})

    def _archive(self, archive: bytes, say_gzip: bool, stop_at: int | None) -> None:
        s = self.server
        start = 0
        wanted = self.headers.get("Range")
        if wanted and not s.ignore_range:
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            if start >= len(archive):
                return self._json(416, {"message": "range not satisfiable"})
        headers = {"Content-Type": "application/gzip"} | ({"Content-Encoding": "gzip"} if say_gzip else {})
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(archive) - 1}/{len(archive)}"
        with s.lock:
            drop = s.drops.pop(0) if s.drops else None
        if drop is not None:  # an offset in the archive: a dropped connection there
            stop_at = max(0, drop - start)
        self._send(206 if start else 200, archive[start:], headers, stop_at)

    def _json(self, status: int, body: dict | bytes, stop_at: int | None = None, headers: dict | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self._send(status, data, {"Content-Type": "application/json", **(headers or {})}, stop_at)

    def _send(self, status: int, body: bytes, headers: dict, stop_at: int | None = None) -> None:
        """Answer; with ``stop_at``, hang up after that many bytes of the body (a dropped connection)."""
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if stop_at is None else body[: max(0, stop_at)])
        if stop_at is not None:
            self.wfile.flush()
            self.close_connection = True
