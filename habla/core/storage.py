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

import errno
import functools
import io
import itertools
import os
import shutil
import socket
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from habla.core.errors import Fault, HablaError, one_line

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


def error_code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


def is_not_found(exc: Exception) -> bool:
    return error_code(exc) in {"404", "NoSuchKey", "NotFound"}


# ------------------------------------------------------------------------------------------------ reads


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except Exception as exc:  # botocore.exceptions.ClientError
        if is_not_found(exc):
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
            if is_not_found(exc):
                raise FileNotFoundError(uri) from None
            # botocore already retried the request itself; this covers a body that broke while streaming.
            if error_code(exc) or attempt == _READ_ATTEMPTS - 1:
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
        if is_not_found(exc):
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
    fd, tmp = temp_beside(local_path)
    os.close(fd)
    try:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                s3_client().download_file(bucket, key, str(tmp))
            except Exception as exc:
                if is_not_found(exc):
                    raise FileNotFoundError(uri) from None
                raise
        else:
            shutil.copyfile(uri, tmp)
        os.replace(tmp, local_path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- writes


def temp_beside(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path``: ``.<name, cut to 80 bytes>.<host>-<pid>-<n>.part``, open for writing.

    The name stays far below the 255-byte limit of a file name whatever ``path`` is, and names its writer,
    so :func:`remove_stale_parts` can tell a killed writer's leftovers from a live one's. The file gets the
    mode a plain ``open()`` gives (0666 less the umask; ``mkstemp`` would make it 0600 whatever the umask,
    unreadable to a pod running as another user). The folder is created when missing.
    """
    short = path.name.encode("utf-8", "surrogateescape")[:80].decode("utf-8", "ignore")
    prefix = f".{short}.{host_tag()}-{os.getpid()}-"
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
    fd, tmp = temp_beside(path)
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
            fd, self._tmp = temp_beside(path)
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
        if self.closed:  # committed (or aborted) already
            return
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
    fd, tmp = temp_beside(path)
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
        why = f"cannot reach bucket s3://{bucket}: {one_line(exc, with_type=True)}"
        code = error_code(exc)  # an answer (no such bucket, access denied) is the user's to fix; none is a fault
        raise (HablaError(why) if code and not code.startswith("5") else Fault(why)) from None


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
            fd, probe = temp_beside(path / "habla-write-probe")  # a name of its own per process and thread
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise HablaError(f"{uri}: cannot write ({exc.strerror})") from None
        return
    check_readable_root(uri)


def stamp(uri: str) -> dict:
    """What changes when a file's content changes, cheaply: size and mtime (local), size and ETag (S3)."""
    if not is_s3(uri):
        info = os.stat(uri)
        return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
    bucket, key = split_s3(uri)
    try:
        head = s3_client().head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if is_not_found(exc):
            raise FileNotFoundError(uri) from None
        raise
    return {"size": head["ContentLength"], "etag": head.get("ETag", "")}


@functools.cache
def host_tag() -> str:
    """This machine, in the names of temporary files (habla.core.leftovers tells whose writer is gone)."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"
