"""Local folders and S3-compatible object storage behind one small API addressed by URI strings.

A location is either a local path or ``s3://bucket/key``. The S3 endpoint and credentials come from the
standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, profiles), so MinIO, SeaweedFS (KFP's default store) and AWS all work.

Every write is atomic: a local file is written to a temporary name in the same folder and renamed (a killed
process never leaves a partial file under the final name); an S3 object only becomes visible when its PUT (or
multipart upload) completes. Transient S3 errors (5xx,
throttling, dropped connections) are retried with backoff by botocore's ``standard`` retry mode, and reads of
a response body that break half-way are retried here.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import itertools
import os
import re
import shutil
import socket
import stat
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from habla.core.errors import HablaError, one_line

S3_PREFIX = "s3://"
_READ_ATTEMPTS = 5
PART_SUFFIX = ".part"  # temporary files of atomic local writes
# A temporary file (or S3 multipart upload) this old is a killed writer's, whoever wrote it.
STALE_PART_SECONDS = 6 * 3600


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_PREFIX)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    bucket, _, key = uri[len(S3_PREFIX) :].partition("/")
    if not bucket:
        raise HablaError(f"not an S3 URI with a bucket: {uri!r}")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI."""
    base = str(base)
    if is_s3(base):
        out = base.rstrip("/")
        for part in parts:
            out += "/" + str(part).strip("/")
        return out
    return str(Path(base, *parts))


def absolute(uri: str) -> str:
    """An S3 URI unchanged, a local path made absolute (manifests must not depend on the working dir)."""
    return uri if is_s3(uri) else str(Path(uri).resolve())


def name(uri: str) -> str:
    """The last component of a path or URI."""
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int


# --------------------------------------------------------------------------------------------- S3 client


@functools.cache
def _client_for_pid(pid: int):  # noqa: ARG001 - the pid is the cache key: boto3 clients must not cross fork()
    import boto3
    from botocore.config import Config

    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", "10"))
    config = Config(
        retries={"max_attempts": attempts, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=32,
    )
    # boto3 reads AWS_ENDPOINT_URL itself; passing it explicitly also covers older botocore releases.
    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None, config=config)


def s3_client():
    """The S3 client of this process (created on first use)."""
    return _client_for_pid(os.getpid())


def _s3_error_code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


def _is_not_found(exc: Exception) -> bool:
    return _s3_error_code(exc) in {"404", "NoSuchKey", "NotFound"}


# ------------------------------------------------------------------------------------------------ reads


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except Exception as exc:  # botocore.exceptions.ClientError
        if _is_not_found(exc):
            return False
        raise


def read_bytes(uri: str, *, byte_range: tuple[int, int] | None = None) -> bytes:
    """The whole object (or ``byte_range=(first, last)`` inclusive). Raises FileNotFoundError if absent."""
    if not is_s3(uri):
        with open(uri, "rb") as f:
            if byte_range is None:
                return f.read()
            f.seek(byte_range[0])
            return f.read(byte_range[1] - byte_range[0] + 1)
    bucket, key = split_s3(uri)
    extra = {"Range": f"bytes={byte_range[0]}-{byte_range[1]}"} if byte_range else {}
    for attempt in range(_READ_ATTEMPTS):
        try:
            return s3_client().get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
        except Exception as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(uri) from None
            # botocore already retried the request itself; this covers a body that broke while streaming.
            if _s3_error_code(exc) or attempt == _READ_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def open_stream(uri: str) -> BinaryIO:
    """A forward-only binary stream (for reading a large archive once without holding it in memory)."""
    if not is_s3(uri):
        return open(uri, "rb")
    bucket, key = split_s3(uri)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    except Exception as exc:
        if _is_not_found(exc):
            raise FileNotFoundError(uri) from None
        raise


def list_files(prefix: str) -> Iterator[ObjectInfo]:
    """Every file under a folder / key prefix, recursively, in lexical order."""
    if not is_s3(prefix):
        root = Path(prefix)
        if not root.is_dir():
            return
        for path in sorted(root.rglob("*")):
            if path.is_file():
                yield ObjectInfo(str(path), path.stat().st_size)
        return
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""
    paginator = s3_client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=key):
        for obj in page.get("Contents", []):
            yield ObjectInfo(f"{S3_PREFIX}{bucket}/{obj['Key']}", obj["Size"])


def download_file(uri: str, local_path: str | Path) -> None:
    """Copy an object to a local file, atomically."""
    local_path = Path(local_path)
    fd, tmp = _local_tmp(local_path)
    os.close(fd)
    try:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                s3_client().download_file(bucket, key, str(tmp))
            except Exception as exc:
                if _is_not_found(exc):
                    raise FileNotFoundError(uri) from None
                raise
        else:
            shutil.copyfile(uri, tmp)
        os.replace(tmp, local_path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- writes


def _local_tmp(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path``: ``.<name, cut to 80 bytes>.<host>-<pid>-<n>.part``, open for writing.

    The name stays far below the 255-byte limit of a file name whatever ``path`` is, and names its writer,
    so :func:`remove_stale_parts` can tell a killed writer's leftovers from a live one's. The file gets the
    mode a plain ``open()`` gives (0666 less the umask; ``mkstemp`` would make it 0600 whatever the umask,
    unreadable to a pod running as another user). The folder is created when missing.
    """
    short = path.name.encode("utf-8", "surrogateescape")[:80].decode("utf-8", "ignore")
    prefix = f".{short}.{_host_tag()}-{os.getpid()}-"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = str(path.parent / f"{prefix}{next(_tmp_counter)}{PART_SUFFIX}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # left by an earlier process with the same pid
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


_tmp_counter = itertools.count()


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers see the old content or the new, never a part."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    fd, tmp = _local_tmp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


class AtomicWriter(io.RawIOBase):
    """A write-only stream published at ``uri`` only when closed without error (``with`` block).

    Local: a temporary file renamed into place. S3: a multipart upload whose parts (``part_size`` bytes) go
    up in background threads while the caller keeps writing, completed on close and aborted on error, so
    the object appears whole or not at all and a large file never has to sit in memory or on local disk.
    """

    def __init__(self, uri: str, part_size: int = 16 * 1024 * 1024, uploads: int = 4) -> None:
        super().__init__()
        self.uri = uri
        self._buffer = bytearray()
        self._part_size = part_size
        if is_s3(uri):
            from concurrent.futures import ThreadPoolExecutor

            self._bucket, self._key = split_s3(uri)
            self._upload_id: str | None = None
            self._parts: list = []
            self._pool = ThreadPoolExecutor(max_workers=uploads)
        else:
            path = Path(uri)
            fd, self._tmp = _local_tmp(path)
            self._file = os.fdopen(fd, "wb")

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if not is_s3(self.uri):
            return self._file.write(data)
        self._buffer += data
        while len(self._buffer) >= self._part_size:
            chunk = bytes(self._buffer[: self._part_size])
            del self._buffer[: self._part_size]
            self._submit(chunk)
        return len(data)

    def _submit(self, chunk: bytes) -> None:
        if self._upload_id is None:
            self._upload_id = s3_client().create_multipart_upload(Bucket=self._bucket, Key=self._key)["UploadId"]
        number = len(self._parts) + 1
        self._parts.append(
            self._pool.submit(
                s3_client().upload_part,
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=chunk,
            )
        )

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def commit(self) -> None:
        try:
            self._publish()
        except BaseException:
            self.abort()
            raise
        io.RawIOBase.close(self)

    def _publish(self) -> None:
        if not is_s3(self.uri):
            self._file.close()
            os.replace(self._tmp, self.uri)
        elif self._upload_id is None:  # smaller than one part: a plain PUT
            s3_client().put_object(Bucket=self._bucket, Key=self._key, Body=bytes(self._buffer))
            self._pool.shutdown()
        else:
            if self._buffer:
                self._submit(bytes(self._buffer))
            parts = [{"PartNumber": i + 1, "ETag": f.result()["ETag"]} for i, f in enumerate(self._parts)]
            self._pool.shutdown()
            s3_client().complete_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": parts}
            )

    def close(self) -> None:
        """Closing without commit() publishes nothing."""
        if not self.closed:
            self.abort()

    def abort(self) -> None:
        if not is_s3(self.uri):
            self._file.close()
            Path(self._tmp).unlink(missing_ok=True)
        else:
            self._pool.shutdown(cancel_futures=True)
            if self._upload_id is not None:
                s3_client().abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id)
        io.RawIOBase.close(self)


def upload_file(local_path: str | Path, uri: str) -> None:
    """Publish a finished local file at ``uri`` atomically (multipart upload for large files on S3)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().upload_file(str(local_path), bucket, key)
        return
    path = Path(uri)
    fd, tmp = _local_tmp(path)
    os.close(fd)
    try:
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy(src: str, dst: str) -> None:
    """Copy one object/file to another location (server-side within S3)."""
    if is_s3(src) and is_s3(dst):
        sb, sk = split_s3(src)
        db, dk = split_s3(dst)
        s3_client().copy({"Bucket": sb, "Key": sk}, db, dk)
    elif is_s3(dst):
        upload_file(src, dst)
    else:
        download_file(src, dst)


def delete(uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink(missing_ok=True)


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create ``uri`` only if nothing exists there; False if something does. Safe between concurrent writers.

    S3: a conditional PUT (``If-None-Match: *``), which AWS S3, MinIO and SeaweedFS honour.
    Local: a hard link of a finished temporary file, which fails if the name exists.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except Exception as exc:
            if _s3_error_code(exc) in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}:
                return False
            raise
    path = Path(uri)
    fd, tmp = _local_tmp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)


# ------------------------------------------------------------------------------ compare-and-swap, probe

_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


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
    if not is_s3(uri):
        try:
            data = Path(uri).read_bytes()
        except FileNotFoundError:
            return None
        return Versioned(data, _content_tag(data))
    bucket, key = split_s3(uri)
    try:
        response = s3_client().get_object(Bucket=bucket, Key=key)
        return Versioned(response["Body"].read(), response["ETag"])
    except Exception as exc:
        if _is_not_found(exc):
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
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=etag)
            return True
        except Exception as exc:
            if _s3_error_code(exc) in _CONFLICT_CODES or _is_not_found(exc):
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
        write_bytes(uri, data)
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


def _put_outcome(bucket: str, key: str, body: bytes, **condition: str) -> str:
    """The status of one conditional PUT: 200, 412, 409, or 501 (the store refuses the header). Other errors
    (access denied, endpoint down) raise: they say nothing about conditional writes."""
    try:
        s3_client().put_object(Bucket=bucket, Key=key, Body=body, **condition)
        return "200"
    except Exception as exc:
        code = _s3_error_code(exc)
        if code in ("PreconditionFailed", "412"):
            return "412"
        if code in ("ConditionalRequestConflict", "409"):
            return "409"
        if code in ("NotImplemented", "501"):
            return "501"
        raise


def _probe_s3(bucket: str, key: str) -> tuple[bool, bool, str]:
    from concurrent.futures import ThreadPoolExecutor

    refused = {"412", "409"}  # 409 ConditionalRequestConflict: AWS's answer to a PUT that raced another
    bodies = [b"habla probe: writer A", b"habla probe: writer B"]
    start = threading.Barrier(2)

    def racer(body: bytes) -> str:
        start.wait(timeout=30)
        return _put_outcome(bucket, key, body, IfNoneMatch="*")

    with ThreadPoolExecutor(max_workers=2) as pool:
        first = list(pool.map(racer, bodies))
    retry = _put_outcome(bucket, key, b"habla probe: sequential retry", IfNoneMatch="*")
    stored = read_versioned(f"{S3_PREFIX}{bucket}/{key}")
    winners = [body for body, outcome in zip(bodies, first) if outcome == "200"]
    if "501" in first:
        return False, False, "a PUT with If-None-Match: * answered 501 NotImplemented"
    if len(winners) > 1:
        return False, False, "two concurrent PUTs with If-None-Match: * both answered 200 OK"
    if retry not in refused:
        return False, False, f"a PUT with If-None-Match: * onto an existing key answered {retry} and overwrote it"
    if stored is None or stored.data not in (winners or bodies):  # none won: a success retried after a dropped reply
        answers = f"{'/'.join(first)}, then {retry}"
        return False, False, f"conditional PUTs answered {answers}, but the key holds another writer's body"
    # Compare-and-swap: the current ETag is accepted, a stale one refused.
    swapped = _put_outcome(bucket, key, b"habla probe: swapped", IfMatch=stored.etag)
    if swapped != "200":
        return True, False, f"a PUT with If-Match: <the current ETag> answered {swapped}"
    stale = _put_outcome(bucket, key, b"habla probe: stale writer", IfMatch=stored.etag)
    after = read_versioned(f"{S3_PREFIX}{bucket}/{key}")
    if stale not in refused or after is None or after.data != b"habla probe: swapped":
        return True, False, f"a PUT with a stale If-Match ETag answered {stale} and overwrote the object"
    return True, True, f"If-None-Match: * answered {'/'.join(sorted(first))} then {retry}; stale If-Match {stale}"


def probe_conditional_writes(root: str, *, ttl: float = PROBE_TTL_SECONDS) -> StoreProbe:
    """Check, by writing, that the store under ``root`` enforces conditional creates and compare-and-swap.

    S3: two concurrent ``PUT``s with ``If-None-Match: *`` to a fresh probe key (one must win, the other get 412,
    409 accepted), one more sequential ``PUT`` (412), then ``If-Match`` with the current ETag (200) and with the
    stale one (412), each checked against what the key holds afterwards; the probe key is deleted. The result is
    cached per endpoint and bucket for ``ttl`` seconds. A local folder needs no probe: the OS gives the same
    guarantees (``link(2)`` refuses an existing name; a rename under an ``flock`` lock file).
    A store that answers with an error (no access, unreachable) raises HablaError; nothing is cached then.
    """
    if not is_s3(root):
        detail = "a local folder: link(2) refuses an existing name; compare-and-swap renames under a lock file"
        return StoreProbe(f"local folder {root}", True, True, detail, time.monotonic())
    bucket, prefix = split_s3(root)
    endpoint = s3_client().meta.endpoint_url
    cached = _probes.get((endpoint, bucket))
    if cached is not None and time.monotonic() - cached.checked < ttl:
        return cached
    key = f"{prefix.strip('/') + '/' if prefix.strip('/') else ''}.habla-probe/{uuid.uuid4().hex}"
    try:
        try:
            create, swap, detail = _probe_s3(bucket, key)
        finally:
            s3_client().delete_object(Bucket=bucket, Key=key)
    except Exception as exc:  # noqa: BLE001 - botocore errors: the probe could not run, which is no verdict
        raise HablaError(f"cannot check conditional writes on s3://{bucket}: {one_line(exc, with_type=True)}") from None
    probe = StoreProbe(f"s3://{bucket} at {endpoint}", create, swap, detail, time.monotonic())
    _probes[(endpoint, bucket)] = probe
    return probe


# ------------------------------------------------------------------------------------------ preflights


def check_readable_root(uri: str) -> None:
    """Fail fast, in one line, when a local folder is missing or a bucket cannot be reached."""
    if not is_s3(uri):
        if not Path(uri).exists():
            raise HablaError(f"{uri}: no such file or folder")
        return
    bucket, _ = split_s3(uri)
    try:
        s3_client().head_bucket(Bucket=bucket)
    except Exception as exc:
        raise HablaError(f"cannot reach bucket s3://{bucket}: {one_line(exc, with_type=True)}") from None


def check_writable_root(uri: str) -> None:
    """Fail fast when the output location cannot be written (bucket missing, no permission, endpoint down)."""
    if not is_s3(uri):
        path = Path(uri)
        if path.exists() and not path.is_dir():
            raise HablaError(f"{uri}: exists and is not a folder")
        if path.is_dir():  # asked without writing: a re-run must not touch the folder (access(2) knows EROFS)
            if not os.access(path, os.W_OK | os.X_OK):
                raise HablaError(f"{uri}: cannot write (permission denied or read-only file system)")
            return
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd, probe = _local_tmp(path / "habla-write-probe")  # a name of its own per process and thread
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise HablaError(f"{uri}: cannot write ({exc.strerror})") from None
        return
    check_readable_root(uri)


# ----------------------------------------------------------------------------- untrusted files, leftovers


class NotAFile(Exception):
    """The location is not a regular file (a FIFO, a device, a folder, a socket, a symlink loop)."""


class TooLarge(Exception):
    """The file is larger than the caller's cap."""


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFDIR: "a folder", stat.S_IFSOCK: "a socket"}  # fmt: skip


def _open_regular(path: str) -> tuple[int, int]:
    """``(fd, size)`` of a regular file, opened without blocking on a FIFO; :class:`NotAFile` otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotAFile("a symbolic link loop") from None
        if exc.errno == errno.ENXIO:
            raise NotAFile("a socket") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotAFile(_KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file"))
    return fd, info.st_size


def open_regular(uri: str) -> BinaryIO:
    """:func:`open_stream` for untrusted locations: a local FIFO, device or folder raises :class:`NotAFile`."""
    if is_s3(uri):
        return open_stream(uri)
    fd, _ = _open_regular(uri)
    return os.fdopen(fd, "rb")


def read_capped(uri: str, limit: int) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes, in bounded memory and time.

    For data whose files are untrusted: a FIFO is opened without blocking and refused, so is a device
    (a symlink to ``/dev/zero`` would never end) or a folder (:class:`NotAFile`); a file over ``limit``
    raises :class:`TooLarge` before it is read. FileNotFoundError if absent; other OSErrors as they come.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            response = s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{limit}")
        except Exception as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(uri) from None
            if _s3_error_code(exc) == "InvalidRange":  # a range on an empty object
                return b""
            raise
        total = int(str(response.get("ContentRange", "")).rpartition("/")[2] or response["ContentLength"])
        if total > limit:
            raise TooLarge(f"{total} bytes, more than {limit}")
        return response["Body"].read()
    fd, size = _open_regular(uri)
    if size > limit:
        os.close(fd)
        raise TooLarge(f"{size} bytes, more than {limit}")
    with os.fdopen(fd, "rb", buffering=0) as f:
        chunks, size = [], 0
        while size <= limit:
            chunk = f.read(limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    if size > limit:  # it grew while being read
        raise TooLarge(f"more than {limit} bytes")
    return b"".join(chunks)


def stamp(uri: str) -> dict:
    """What changes when a file's content changes, cheaply: size and mtime (local), size and ETag (S3)."""
    if not is_s3(uri):
        info = os.stat(uri)
        return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
    bucket, key = split_s3(uri)
    try:
        head = s3_client().head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if _is_not_found(exc):
            raise FileNotFoundError(uri) from None
        raise
    return {"size": head["ContentLength"], "etag": head.get("ETag", "")}


@functools.cache
def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


_PART_NAME = re.compile(r"^\..*\.([0-9a-f]{8})-(\d+)-[^./]*" + re.escape(PART_SUFFIX) + "$")


def _writer_is_dead(host: str, pid: int) -> bool:
    if host != _host_tag():
        return False  # another machine's: only its age tells
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_parts(root: str) -> int:
    """Delete what killed writers left under ``root``; returns how many. Live writers' files are kept.

    Local: temporary files of :func:`write_bytes` & co. whose process on this machine is gone, or older
    than :data:`STALE_PART_SECONDS` (another machine's). S3: multipart uploads under the prefix started
    more than :data:`STALE_PART_SECONDS` ago (an upload in progress cannot be told from a dead one sooner).
    """
    removed = 0
    if is_s3(root):
        bucket, key = split_s3(root)
        prefix = key.rstrip("/") + "/" if key else ""
        cutoff = time.time() - STALE_PART_SECONDS
        for page in s3_client().get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                if upload["Initiated"].timestamp() < cutoff:
                    s3_client().abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    removed += 1
        return removed
    if not os.path.isdir(root):
        return 0
    cutoff = time.time() - STALE_PART_SECONDS
    for folder, _, files in os.walk(root):
        for name in files:
            match = _PART_NAME.match(name)
            if match is None:  # not a temporary file of ours (a staged clip may be called x.part)
                continue
            path = os.path.join(folder, name)
            try:
                stale = _writer_is_dead(match[1], int(match[2])) or os.lstat(path).st_mtime < cutoff
                if stale:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                pass  # its writer finished meanwhile
    return removed
