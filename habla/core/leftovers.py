"""What killed writers leave behind (temporary files of atomic local writes, S3 multipart uploads), found and
removed without touching a live writer's."""

from __future__ import annotations

import os
import re
import time

from habla.core import storage

_PART_NAME = re.compile(r"^\..*\.([0-9a-f]{8})-(\d+)-[^./]*" + re.escape(storage.PART_SUFFIX) + "$")


def _writer_is_dead(host: str, pid: int) -> bool:
    if host != storage.host_tag():
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

    Local: temporary files of ``storage.write_bytes`` & co. whose process on this machine is gone, or older
    than ``storage.STALE_PART_SECONDS`` (another machine's). S3: multipart uploads under the prefix started
    more than ``STALE_PART_SECONDS`` ago (an upload in progress cannot be told from a dead one sooner).
    """
    removed = 0
    if storage.is_s3(root):
        client = storage.s3_client()
        bucket, key = storage.split_s3(root)
        prefix = key.rstrip("/") + "/" if key else ""
        cutoff = time.time() - storage.STALE_PART_SECONDS
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                if upload["Initiated"].timestamp() < cutoff:
                    client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    removed += 1
        return removed
    if not os.path.isdir(root):
        return 0
    cutoff = time.time() - storage.STALE_PART_SECONDS
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
