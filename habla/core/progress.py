"""Progress for long loops: a tqdm bar on a terminal, a log line every ``interval`` seconds otherwise."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

log = logging.getLogger("habla.progress")


class Progress:
    """Counts items and audio seconds; shows items/s and audio hours per wall-clock hour."""

    def __init__(self, total: int, desc: str, unit: str = "clip", interval: float = 30.0) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.done = 0
        self.audio_seconds = 0.0
        self.start = self._last_log = time.monotonic()
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1, audio_seconds: float = 0.0) -> None:
        self.done += n
        self.audio_seconds += audio_seconds
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix_str(f"{self._audio_rate(now):.1f} audio h/h", refresh=False)
        elif now - self._last_log >= self.interval:
            self._last_log = now
            self._log(now)

    def _audio_rate(self, now: float) -> float:
        """Audio hours converted per wall-clock hour (i.e. x real time)."""
        return self.audio_seconds / max(now - self.start, 1e-9)

    def _log(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        log.info(
            "%s: %d/%d %ss (%.1f%%), %.1f %s/s, %.2f h of audio, %.0fx real time",
            self.desc,
            self.done,
            self.total,
            self.unit,
            100 * self.done / max(self.total, 1),
            self.done / elapsed,
            self.unit,
            self.audio_seconds / 3600,
            self._audio_rate(now),
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._log(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def output_to(path: str):
    """Meanwhile, everything written to this process's stdout and stderr (file descriptors 1 and 2: Python, C
    libraries, NeMo's and Lightning's loggers) is appended to the local file ``path`` instead of the console."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a", encoding="utf-8") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
