"""Files named by data (TSV rows, manifests, user arguments) are untrusted: read them only if they are regular
files, in bounded memory and time. A FIFO would block for ever, a link to ``/dev/zero`` never end."""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from habla.core import storage


class NotAFile(Exception):
    """The location is not a regular file (a FIFO, a device, a folder, a socket, a symlink loop)."""


class TooLarge(Exception):
    """The file is larger than the caller's cap."""


def is_plain_name(name: str) -> bool:
    """A plain, printable file name: no folder part, no leading dot (``..``), no control characters or line
    breaks. A name from data that is used as a file name must pass this, or it could escape its folder."""
    return bool(name) and name[0] != "." and "/" not in name and "\\" not in name and name.isprintable()


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
    if storage.is_s3(uri):
        return storage.open_stream(uri)
    fd, _ = _open_regular(uri)
    return os.fdopen(fd, "rb")


def read_capped(uri: str, limit: int) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes, in bounded memory and time.

    For data whose files are untrusted: a FIFO is opened without blocking and refused, so is a device
    (a symlink to ``/dev/zero`` would never end) or a folder (:class:`NotAFile`); a file over ``limit``
    raises :class:`TooLarge` before it is read. FileNotFoundError if absent; other OSErrors as they come.
    """
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        try:
            response = storage.s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{limit}")
        except Exception as exc:
            if storage.is_not_found(exc):
                raise FileNotFoundError(uri) from None
            if storage.error_code(exc) == "InvalidRange":  # a range on an empty object
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
