"""Where a long recording is cut into the windows a model sees.

The model sees windows of ``WINDOW_S`` seconds, each with ``CONTEXT_S`` seconds of audio on either side; only
each window's middle frames are kept and the pieces, laid end to end, are decoded once by the model's own
decoding (which computes NeMo's timestamps and confidence). What is held of a recording is the window being read
and one label per output frame, so memory depends on the window, not on the recording: a 10-minute file costs 30
windows of 28 s. (With ``--confidence`` each frame's log-probabilities are kept instead: 25 MB an hour for
``tiny_ctc_char``, about 185 MB for a 1,024-token BPE model.)
This is the rule of NeMo's buffered CTC inference (``FrameBatchASR``: buffers, keep the middle tokens,
per-buffer feature normalization); habla does not call ``FrameBatchASR`` itself because it needs a BPE
tokenizer (habla's default models are character-based), reads files from paths, and returns text without
timestamps or confidence. A recording no longer than one window plus its context is one window: the same
forward pass and decoding as NeMo's ``model.transcribe``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

WINDOW_S = 20.0  # seconds of audio whose frames each window keeps
CONTEXT_S = 4.0  # seconds of audio seen on each side of a window's kept part


class Window(NamedTuple):
    """One window of a recording, cut from its stream."""

    samples: np.ndarray
    skip: int  # output frames before the kept ones
    keep: int | None  # output frames kept; None: every one from ``skip`` on (the recording's last window)
    end: int  # the number of the sample after the window's last (for the last window: the recording's length)


@dataclass(frozen=True)
class WindowRule:
    """Where a recording's windows lie: window k keeps output frames [k·kept, (k+1)·kept), computed from its
    audio and ``context`` samples more on either side; the last window keeps every frame to the end, and a
    recording of at most ``kept`` frames plus both contexts is one window."""

    frame: int  # samples per output frame
    kept: int  # output frames kept per window
    context: int  # samples seen on each side of the kept part (whole frames)

    @classmethod
    def of(cls, frame_samples: int, window_s: float, context_s: float, rate: int) -> WindowRule:
        kept = max(1, round(window_s * rate / frame_samples))
        return cls(frame_samples, kept, round(context_s * rate / frame_samples) * frame_samples)

    def start(self, first: int) -> int:
        """The first sample of the window whose kept frames start at frame ``first``."""
        return max(0, first * self.frame - self.context)

    def plan(self, first: int, known: int, ended: bool) -> tuple[int, int, int, int | None] | None:
        """``(first sample, end sample, skip, keep)`` of the window whose kept frames start at frame ``first``,
        given the ``known`` samples read so far (all there are once ``ended``); None while it takes more
        samples to tell whether this window is the last."""
        single = self.kept * self.frame + 2 * self.context
        end = (first + self.kept) * self.frame + self.context
        if not ended and known <= (single if first == 0 else end):
            return None
        if first == 0 and known <= single:
            return 0, known, 0, None
        start = self.start(first)
        last = end >= known
        return start, min(end, known), first - start // self.frame, None if last else self.kept


def plan_windows(samples: int, frame_samples: int, window_s: float, context_s: float, rate: int):
    """The windows of a recording of ``samples`` samples: ``(first sample, end sample, skip, keep)`` each
    (WindowRule)."""
    rule = WindowRule.of(frame_samples, window_s, context_s, rate)
    plans, first = [], 0
    while True:
        plans.append(rule.plan(first, samples, True))
        if plans[-1][3] is None:
            return plans
        first += rule.kept


def cut_windows(blocks: Iterable[np.ndarray], rule: WindowRule) -> Iterator[Window]:
    """The windows of a recording read as a stream of sample blocks, each as soon as its samples are read;
    only the samples from the current window's start on are held."""
    blocks = iter(blocks)
    held: list[np.ndarray] = []  # the samples from ``offset`` on
    offset = known = first = 0
    ended = False
    while True:
        plan = rule.plan(first, known, ended)
        if plan is None:
            block = next(blocks, None)
            ended = block is None
            if block is not None:
                held.append(block)
                known += len(block)
            continue
        start, end, skip, keep = plan
        samples = np.concatenate(held) if held else np.zeros(0, dtype=np.float32)
        yield Window(samples[start - offset : end - offset].copy(), skip, keep, end)
        if keep is None:
            return
        first += keep
        held, offset = [samples[rule.start(first) - offset :]], rule.start(first)
