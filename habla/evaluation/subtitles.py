"""Subtitles from word timestamps: SRT and WebVTT cues (``habla transcribe --timestamps``).

Words are grouped into cues of at most ``MAX_CHARS`` characters (one line, the usual broadcast limit) and
``MAX_SECONDS`` seconds; a pause longer than ``PAUSE_SECONDS`` starts a new cue. A cue lasts from its first
word's start to its last word's end (at least ``MIN_SECONDS``, never into the next cue).
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_CHARS = 42
MAX_SECONDS = 6.0
PAUSE_SECONDS = 1.0
MIN_SECONDS = 0.5


def cues(words: Sequence[dict]) -> list[tuple[float, float, str]]:
    """``(start, end, text)`` per cue, in order, from ``[{"word", "start", "end"}, …]`` (seconds)."""
    groups: list[list[dict]] = []
    for word in words:
        text = str(word.get("word", "")).strip()
        if not text:
            continue
        current = groups[-1] if groups else None
        if current:
            length = sum(len(w["word"]) + 1 for w in current) + len(text)
            if (length > MAX_CHARS or word["end"] - current[0]["start"] > MAX_SECONDS
                    or word["start"] - current[-1]["end"] > PAUSE_SECONDS):  # fmt: skip
                current = None
        if current is None:
            groups.append([])
        groups[-1].append({"word": text, "start": float(word["start"]), "end": float(word["end"])})
    out = []
    for k, group in enumerate(groups):
        start, end = group[0]["start"], max(group[-1]["end"], group[0]["start"] + MIN_SECONDS)
        if k + 1 < len(groups):
            end = min(end, groups[k + 1][0]["start"])
        out.append((start, max(end, start), " ".join(w["word"] for w in group)))
    return out


def _clock(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def srt(words: Sequence[dict]) -> str:
    """SubRip: numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``."""
    blocks = [f"{k}\n{_clock(s, ',')} --> {_clock(e, ',')}\n{text}\n" for k, (s, e, text) in enumerate(cues(words), 1)]
    return "\n".join(blocks)


def vtt(words: Sequence[dict]) -> str:
    """WebVTT: a ``WEBVTT`` header, then cues ``HH:MM:SS.mmm --> HH:MM:SS.mmm``."""
    blocks = [f"{_clock(s, '.')} --> {_clock(e, '.')}\n{text}\n" for s, e, text in cues(words)]
    return "WEBVTT\n\n" + "\n".join(blocks)
