"""A stand-in of the Mozilla Data Collective's download API on loopback, for download tests.

What it serves, and how it was checked against the ``datacollective`` SDK (PyPI, version 0.7.0; read, not
copied):

* ``GET /api/datasets?…``: the public catalog, ``{"items": [...], "total": n}`` (habla.ops.mdc reads
  ``id``, ``name``, ``locale``, ``shortDescription``).
* ``POST /api/datasets/<id>/download`` with ``Authorization: Bearer <key>``: a download session
  ``{"downloadUrl", "sizeBytes", "checksum"}``, the three fields the SDK's ``_build_download_plan`` reads. The
  checksum is the archive's SHA-256 hex digest, which is what the SDK computes and sends when a dataset is
  uploaded (``upload_utils._upload_parts_and_compute_checksum``). Each session gets a new URL, as presigned
  URLs do.
* ``GET /files/<session>/<id>.tar.gz``: the archive, without the key (the SDK sends none:
  ``include_auth_headers=False``). ``Range: bytes=N-`` is answered with ``206 Partial Content`` and a
  ``Content-Range`` header, as S3/CloudFront presigned URLs do and as the SDK's resume relies on.

Faults to inject: ``drops`` (byte offsets at which the next archive responses stop, one per response),
``ignore_range`` (answer a range request with the whole archive, 200), ``checksum`` (announce another digest).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY = "mdc-test-key-not-a-secret"


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
        self.sessions = 0
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers)
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def ranges(self) -> list[str | None]:
        """The Range header of every archive request, in order."""
        return [h.get("Range") for m, p, h in self.requests if m == "GET" and p.startswith("/files/")]

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

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        s = self.server
        with s.lock:
            s.requests.append(("GET", self.path, dict(self.headers)))
        if self.path.startswith("/api/datasets?"):
            item = {"id": s.dataset_id, "name": s.title, "locale": "es", "shortDescription": s.corpus,
                    "sizeBytes": len(s.archive)}  # fmt: skip
            return self._json(200, {"items": [item], "total": 1})
        if not self.path.startswith("/files/") or not self.path.endswith(f"/{s.dataset_id}.tar.gz"):
            return self._json(404, {"message": "not found"})
        start = 0
        wanted = self.headers.get("Range")
        if wanted and not s.ignore_range:
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            if start >= len(s.archive):
                return self._json(416, {"message": "range not satisfiable"})
        body = s.archive[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(s.archive) - 1}/{len(s.archive)}")
        self.end_headers()
        with s.lock:
            drop = s.drops.pop(0) if s.drops else None
        if drop is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[: max(0, drop - start)])  # then hang up mid-body: a dropped connection
        self.wfile.flush()
        self.close_connection = True

    def do_POST(self) -> None:
        s = self.server
        with s.lock:
            s.requests.append(("POST", self.path, dict(self.headers)))
            s.sessions += 1
            session = s.sessions
        if self.path != f"/api/datasets/{s.dataset_id}/download":
            return self._json(404, {"message": "no such dataset"})
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._json(401, {"message": "invalid API key"})
        url = f"{s.url}/files/session-{session}/{s.dataset_id}.tar.gz"
        self._json(200, {"downloadUrl": url, "sizeBytes": len(s.archive), "checksum": s.checksum})
