"""Checkpoint uploads in the background: training never waits on object storage.

Rank 0 saves a checkpoint to its local disk (fast) and hands the file to :class:`BackgroundUploads`, which
uploads it from one thread while training goes on; at 8 × 8 GPUs a synchronous upload of a 1.3 GB checkpoint
would hold all 64 ranks at the next collective. What it guarantees:

- **What is uploaded is what was saved**: the upload reads a hard link taken at hand-over, so Lightning may
  overwrite (``last.ckpt``) or remove (top-k rotation) the local file meanwhile.
- **Order**: uploads and removals reach the remote folder in the order they were handed over. An upload still
  waiting when a newer version of the same file arrives, or when the file is removed, is dropped: a store
  slower than the checkpoints skips versions instead of falling further behind.
- **Bounded**: at most ``max_waiting`` uploads wait; one more blocks the hand-over (the disk holds at most that
  many extra copies).
- **Failures are not silent**: each failed upload is logged; ``max_failures`` failures in a row raise at the
  next hand-over (the run stops instead of training for hours with nothing saved), and :meth:`wait` (the end
  of the run) raises when the latest version of any file failed to upload.

An object store publishes an object only once its upload completes, so a run killed mid-upload leaves the
previous ``last.ckpt`` in place, and ``--resume`` continues from that one, exactly.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from habla.core import storage
from habla.core.errors import Fault, one_line

log = logging.getLogger("habla.train")

MAX_WAITING = 2
MAX_FAILURES = 3


@dataclass
class _Job:
    remote: str
    snapshot: Path | None  # None: remove the remote file
    label: str


class BackgroundUploads:
    """One uploader thread for a run's checkpoints (see the module docstring)."""

    def __init__(
        self,
        after_upload: Callable[[], None] | None = None,
        max_waiting: int = MAX_WAITING,
        max_failures: int = MAX_FAILURES,
    ) -> None:
        self.after_upload = after_upload
        self.max_waiting, self.max_failures = max_waiting, max_failures
        self._jobs: deque[_Job] = deque()
        self._busy = False
        self._failed: dict[str, str] = {}  # remote -> why its latest upload failed
        self._failures_in_a_row = 0
        self._sequence = 0
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="habla-checkpoint-uploads", daemon=True)
        self._thread.start()

    # -- the training thread
    def upload(self, local: str | Path, remote: str, label: str = "") -> None:
        """Upload ``local`` to ``remote`` in the background (a snapshot of its current content)."""
        local = Path(local)
        self._sequence += 1
        spool = local.parent.with_name(f".{local.parent.name}-uploads")  # same filesystem: a link, not a copy
        spool.mkdir(exist_ok=True)
        snapshot = spool / f"{self._sequence}-{local.name}"
        try:
            os.link(local, snapshot)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(local, snapshot)
        self._submit(_Job(remote, snapshot, label))

    def remove(self, remote: str) -> None:
        """Remove ``remote`` once the uploads handed over before are done."""
        self._submit(_Job(remote, None, "removal"))

    def _submit(self, job: _Job) -> None:
        with self._changed:
            if self._failures_in_a_row >= self.max_failures:
                why = next(reversed(self._failed.values()), "")
                raise Fault(f"{self._failures_in_a_row} checkpoint uploads in a row failed (last: {why})")
            for waiting in [j for j in self._jobs if j.remote == job.remote]:
                self._jobs.remove(waiting)  # superseded before it started
                _discard(waiting.snapshot)
            self._jobs.append(job)
            self._changed.notify_all()
            started = time.monotonic()
            while sum(j.snapshot is not None for j in self._jobs) > self.max_waiting:
                self._changed.wait()
            if time.monotonic() - started > 1:
                log.warning("checkpoint uploads fall behind: the save waited %.0f s for the object store",
                            time.monotonic() - started)  # fmt: skip

    def wait(self) -> None:
        """Block until every upload handed over is done; Fault if the latest version of any file failed."""
        with self._changed:
            while self._jobs or self._busy:
                self._changed.wait()
            if self._failed:
                remote, why = next(iter(self._failed.items()))
                raise Fault(f"checkpoint upload to {remote} failed: {why}")

    # -- the uploader thread
    def _work(self) -> None:
        while True:
            with self._changed:
                while not self._jobs:
                    self._changed.wait()
                job = self._jobs.popleft()
                self._busy = True
            try:
                self._run(job)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _run(self, job: _Job) -> None:
        started = time.monotonic()
        try:
            if job.snapshot is None:
                storage.delete(job.remote)
            else:
                storage.upload_file(job.snapshot, job.remote)
                if self.after_upload:
                    self.after_upload()
        except Exception as exc:  # logged and counted: training goes on, the next hand-over or wait() raises
            why = f"{type(exc).__name__}: {one_line(exc)}"
            log.error("checkpoint %s -> %s failed: %s", job.label or "upload", job.remote, why)
            with self._changed:
                self._failed[job.remote] = why
                self._failures_in_a_row += 1
        else:
            with self._changed:
                self._failed.pop(job.remote, None)
                self._failures_in_a_row = 0
            if job.snapshot is not None:
                log.info("checkpoint %s -> %s (%.1f s, in the background)", job.label, job.remote,
                         time.monotonic() - started)  # fmt: skip
        finally:
            _discard(job.snapshot)


def _discard(snapshot: Path | None) -> None:
    if snapshot is not None:
        snapshot.unlink(missing_ok=True)
