"""An HTTP proxy in front of a real S3 server that fails requests the way real endpoints do, ignores or
refuses conditional writes the way some stores do, or writes slowly, as a distant store does."""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FlakyProxy(ThreadingHTTPServer):
    """An HTTP proxy in front of the S3 server that fails some requests the way real endpoints do.

    Every ``fail_before``-th request gets a 503 SlowDown without reaching the server; every
    ``fail_after``-th is forwarded and then answered with a 500, so the client retries a request that
    already took effect (writes must be idempotent); 0 turns either off. ``drop_conditions`` strips
    ``If-None-Match`` and ``If-Match`` from every request: a store that ignores conditional writes (older MinIO,
    S3 gateways, SeaweedFS before 2025), in front of one that enforces them; ``refuse_conditions`` answers
    such a PUT 501 NotImplemented, as AWS S3 did before 2024 (ceph/s3-tests#218). ``slow_writes`` seconds are
    spent on every PUT or POST whose path contains ``slow_paths`` before it reaches the server (the object
    appears only after that, as a slow upload's does); ``slowed`` counts them, ``writing`` those under way.
    ``slow_reads`` seconds are spent likewise on every GET whose path contains ``slow_paths`` (a store in another
    zone: request latency); ``reading_peak`` is the most such GETs that were ever under way at once.
    """

    daemon_threads = True

    def __init__(
        self,
        upstream: str,
        fail_before: int = 5,
        fail_after: int = 7,
        *,
        drop_conditions: bool = False,
        refuse_conditions: bool = False,
        slow_writes: float = 0.0,
        slow_paths: str = "",
        slow_reads: float = 0.0,
    ) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream.removeprefix("http://")
        self.fail_before, self.fail_after = fail_before, fail_after
        self.drop_conditions, self.refuse_conditions = drop_conditions, refuse_conditions
        self.slow_writes, self.slow_paths = slow_writes, slow_paths
        self.slowed = self.writing = 0
        self.slow_reads = slow_reads
        self.reading = self.reading_peak = 0
        self.dropped = 0
        self.requests = 0
        self.failed = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size + 2)[:size]
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _fail(self, status: int, code: str) -> None:
        body = f"<Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        server: FlakyProxy = self.server  # type: ignore[assignment]
        body = self._body()
        with server.lock:
            server.requests += 1
            n = server.requests
        if server.fail_before and n % server.fail_before == 0:
            with server.lock:
                server.failed += 1
            return self._fail(503, "SlowDown")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
        conditional = {"if-none-match", "if-match"} & {k.lower() for k in headers}
        if server.refuse_conditions and self.command == "PUT" and conditional:
            return self._fail(501, "NotImplemented")
        if server.drop_conditions and self.command == "PUT":
            kept = {k: v for k, v in headers.items() if k.lower() not in ("if-none-match", "if-match")}
            with server.lock:
                server.dropped += len(headers) - len(kept)
            headers = kept  # moto does not check SigV4 signatures, so the request goes through as sent minus these
        headers["Content-Length"] = str(len(body))
        slow_write = server.slow_writes and self.command in ("PUT", "POST") and server.slow_paths in self.path
        if slow_write:
            with server.lock:
                server.slowed += 1
                server.writing += 1
            time.sleep(server.slow_writes)
        if server.slow_reads and self.command == "GET" and server.slow_paths in self.path:
            with server.lock:
                server.reading += 1
                server.reading_peak = max(server.reading_peak, server.reading)
            time.sleep(server.slow_reads)
            with server.lock:
                server.reading -= 1
        conn = http.client.HTTPConnection(server.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            if slow_write:  # under way until the store has answered, even when its writer is gone
                with server.lock:
                    server.writing -= 1
        if server.fail_after and n % server.fail_after == 0:
            with server.lock:
                server.failed += 1
            return self._fail(500, "InternalError")
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
