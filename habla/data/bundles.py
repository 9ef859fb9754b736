"""Per-shard bundles of clips: how an archive's clips reach the conversion in a few object-store requests per
shard instead of one per clip.

While the archive streams by (habla.data.archive), each clip a shard needs is appended to that shard's buffer;
a full buffer is written as one object, ``bundles/shard-<k>/<n>.bin`` (the clips' bytes back to back). At the
end each shard gets its index, ``bundles/shard-<k>.json``: its chunks' sizes, and per clip (name, chunk, offset,
size), or why it was not bundled (a clip over the size cap). The chunks follow from the archive and the plan
alone (buffers are flushed when full, or the largest when all of them together reach BUFFER_BUDGET), so an
interrupted pass, run again, writes the same chunks and skips the ones already there. The conversion of shard k
reads its index and its chunks: one GET each, in parallel (:func:`open_shard`).
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from habla.core import state, storage

#: All shards' buffers together stay under this; one buffer is written once it reaches CHUNK_BYTES.
BUFFER_BUDGET = 256 << 20
CHUNK_BYTES = 16 << 20
_UPLOADS = 4  # chunk writes in flight (each holds its chunk's memory)
_INDEX_FIELDS = {"chunks": list, "clips": list, "skipped": dict}


def folder(root: str) -> str:
    """The bundles of a staged locale folder."""
    return storage.join(root, "bundles")


def chunk_uri(root: str, shard: int, number: int) -> str:
    return storage.join(folder(root), f"shard-{shard:05d}", f"{number:05d}.bin")


def index_uri(root: str, shard: int) -> str:
    return storage.join(folder(root), f"shard-{shard:05d}.json")


class Writer:
    """Clips appended to their shard's bundle in arrival order; chunks written in the background."""

    def __init__(self, root: str, shards: int, existing: dict[str, int]) -> None:
        self.root, self.shards = root, shards
        self._existing = existing  # chunks already written (by an interrupted pass): uri -> size
        self._buffers = [bytearray() for _ in range(shards)]
        self._clips: list[list[list]] = [[] for _ in range(shards)]
        self._skipped: list[dict[str, list[str]]] = [{} for _ in range(shards)]
        self._chunks: list[list[int]] = [[] for _ in range(shards)]
        self._buffered = 0
        self._pool = ThreadPoolExecutor(max_workers=_UPLOADS, thread_name_prefix="habla-bundle")
        self._pending: deque[Future] = deque()
        self.written = self.reused = 0  # chunks

    def add(self, shard: int, name: str, data: bytes) -> None:
        buffer = self._buffers[shard]
        if buffer and len(buffer) + len(data) > CHUNK_BYTES:
            self._flush(shard)
            buffer = self._buffers[shard]
        self._clips[shard].append([name, len(self._chunks[shard]), len(buffer), len(data)])
        buffer += data
        self._buffered += len(data)
        while self._buffered > BUFFER_BUDGET:  # the fullest buffer goes (the lowest shard of equals: deterministic)
            self._flush(max(range(self.shards), key=lambda k: (len(self._buffers[k]), -k)))

    def skip(self, shard: int, name: str, reason: str, detail: str) -> None:
        self._skipped[shard][name] = [reason, detail]

    def _flush(self, shard: int) -> None:
        data = bytes(self._buffers[shard])
        self._buffers[shard] = bytearray()
        self._buffered -= len(data)
        uri = chunk_uri(self.root, shard, len(self._chunks[shard]))
        self._chunks[shard].append(len(data))
        if self._existing.get(uri) == len(data):  # written whole by an interrupted pass: the same bytes
            self.reused += 1
            return
        while len(self._pending) >= _UPLOADS:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(storage.write_bytes, uri, data))
        self.written += 1

    def finish(self) -> None:
        """Write the last chunks and every shard's index (after its chunks: an index means a complete bundle)."""
        try:
            for shard in range(self.shards):
                if self._buffers[shard]:
                    self._flush(shard)
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(cancel_futures=True)
        for shard in range(self.shards):
            index = {"chunks": self._chunks[shard], "clips": self._clips[shard], "skipped": self._skipped[shard]}
            state.write(index_uri(self.root, shard), index, indent=None)

    def abort(self) -> None:
        self._pool.shutdown(cancel_futures=True)


@dataclass(frozen=True)
class Member:
    """A clip's bytes: ``size`` bytes at ``offset`` of the local file ``path``."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), self.size, self.offset)


@dataclass
class ShardClips:
    """The clips a shard's bundle holds (name -> :class:`Member`) and those it does not (name -> [reason, detail])."""

    members: dict[str, Member]
    skipped: dict[str, list[str]]


@contextlib.contextmanager
def open_shard(root: str, shard: int, scratch: Path) -> Iterator[ShardClips]:
    """Shard ``shard``'s bundle, readable locally: its chunks themselves (a local staging), or downloaded into
    ``scratch`` with one GET per chunk, several at a time (object storage)."""
    index = state.load(index_uri(root, shard), _INDEX_FIELDS, what="bundle index",
                       remedy="delete the dataset folder's staging/ and plan/ (or use a new --out)")  # fmt: skip
    paths = [chunk_uri(root, shard, n) for n in range(len(index["chunks"]))]
    if storage.is_s3(root):
        local = [str(scratch / f"{shard:05d}-{n:05d}.bin") for n in range(len(paths))]
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="habla-bundle") as pool:
            for done in pool.map(storage.download_file, paths, local):
                del done
        paths = local
    members = {name: Member(paths[chunk], offset, size) for name, chunk, offset, size in index["clips"]}
    yield ShardClips(members, index["skipped"])
