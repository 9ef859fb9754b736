"""MP3 → 16 kHz mono 16-bit PCM WAV, in-process: libsndfile (via soundfile) decodes, soxr resamples.

No subprocess per clip: spawning ffmpeg or sox for every clip is 4-20x slower (see bench/RESULTS.md).
Clips are untrusted: what is decoded is bounded (sample rate, channels, and frames up to a duration cap),
so a hostile file cannot take unbounded memory or time. Recordings of any length (habla transcribe) are
decoded and resampled as a stream, block by block (:func:`stream`).
"""

from __future__ import annotations

import io
import math
import re
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from habla.core.errors import one_line

TARGET_RATE = 16_000
# How much shorter than the release's stated duration a decoded clip may be before it counts as truncated.
# MP3 encoder padding and frame rounding are a few tens of milliseconds.
TRUNCATION_TOLERANCE_S = 0.25
#: The largest clip file read: a Common Voice clip is tens of kB, 20 s of 4-channel 96 kHz 24-bit PCM 23 MB.
MAX_CLIP_BYTES = 32 * 1024 * 1024
#: Sample rates and channel counts accepted as speech recordings.
MIN_RATE, MAX_RATE, MAX_CHANNELS = 8_000, 192_000, 8
#: A clip whose RMS level (DC removed) is below this holds no speech: digital silence or a dead microphone.
#: Quiet Common Voice speech sits near -35 dBFS; -60 dBFS is the noise floor of a silent room.
SILENCE_DBFS = -60.0


class AudioRejected(ValueError):
    """A clip that cannot become training audio. ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedAudio:
    mono: np.ndarray  # float32 at TARGET_RATE
    source_rate: int
    source_channels: int
    level_dbfs: float  # RMS level without DC, in dB relative to full scale (-inf: digital silence)

    @property
    def duration(self) -> float:
        """Seconds, measured from decoded samples (MP3 headers are unreliable)."""
        return len(self.mono) / TARGET_RATE


def _level_dbfs(mono: np.ndarray) -> float:
    """RMS level without DC in dBFS; NaN if a sample is not finite. (einsum, not np.dot: OpenBLAS would
    start threads for a long vector, and on a busy machine they spin.)"""
    n = len(mono)
    if n == 0:
        return -math.inf
    mean = float(mono.sum()) / n  # float32 pairwise summation: accurate enough, 8x faster
    power = float(np.einsum("i,i->", mono, mono)) / n - mean * mean
    if not math.isfinite(power):
        return math.nan
    return 10 * math.log10(power) if power > 1e-30 else -math.inf


@dataclass(frozen=True)
class ConvertedAudio:
    wav: bytes
    duration: float  # seconds, measured from decoded samples
    source_rate: int
    source_channels: int


_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>|\bat 0x[0-9a-fA-F]+")


def _error_detail(exc: Exception) -> str:
    """A decoder error without the object it was given: ``<_io.BytesIO object at 0x…>`` differs between
    runs, and rejected.jsonl must not."""
    text = getattr(exc, "error_string", None) or one_line(exc, first_line=True, limit=200)
    return _ADDRESS.sub("<data>", str(text))[:200]


# What libsndfile (through soundfile) raises on data it cannot decode.
_DECODE_ERRORS = (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OverflowError, MemoryError)


def _check_format(f: sf.SoundFile) -> int:
    """The file's sample rate, if its rate and channel count are those of a speech recording (else AudioRejected):
    what is decoded per frame stays bounded."""
    rate, channels = f.samplerate, f.channels
    if not MIN_RATE <= rate <= MAX_RATE or not 1 <= channels <= MAX_CHANNELS:
        raise AudioRejected(
            "unsupported_audio",
            f"{rate} Hz, {channels} channel(s); accepted: {MIN_RATE}-{MAX_RATE} Hz, 1-{MAX_CHANNELS} channels",
        )
    return rate


def decode(data: bytes, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode compressed audio bytes to float32, shape (frames,) or (frames, channels). Raises AudioRejected.

    With ``max_seconds``, at most that many seconds (+1) are decoded: a longer clip is ``too_long`` without
    decoding the rest.
    """
    if not data:
        raise AudioRejected("empty_file")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate = _check_format(f)
            limit = -1 if max_seconds is None else int((max_seconds + 1) * rate)
            samples = f.read(frames=limit, dtype="float32", always_2d=False)
            if limit >= 0 and len(samples) >= limit and f.read(frames=1, dtype="float32").size:
                raise AudioRejected("too_long", f"> {max_seconds + 1:.0f}s")
    except AudioRejected:
        raise
    except _DECODE_ERRORS as exc:
        raise AudioRejected("decode_error", _error_detail(exc)) from None
    if samples.shape[0] == 0:
        raise AudioRejected("no_audio", "decoded to zero samples")
    return samples, rate


def downmix(samples: np.ndarray) -> np.ndarray:
    """Mono samples: the mean of the channels of (frames, channels) samples; 1-D samples as they are."""
    if samples.ndim == 1:
        return samples
    # channel by channel: 2x faster than mean(axis=1), and no BLAS threads (a matmul)
    mono = samples[:, 0].copy()
    for channel in range(1, samples.shape[1]):
        mono += samples[:, channel]
    mono *= np.float32(1.0 / samples.shape[1])
    return mono


def to_target(samples: np.ndarray, rate: int) -> np.ndarray:
    """Down-mix to mono and resample to 16 kHz (soxr, high quality)."""
    mono = downmix(samples)
    if rate != TARGET_RATE:
        mono = soxr.resample(mono, rate, TARGET_RATE, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


#: Frames :func:`stream` decodes at a time: 2.7 s at 48 kHz, at most 4 MiB of float32 samples for 8 channels.
STREAM_BLOCK_FRAMES = 1 << 17


class _ForwardReader(sf.SoundFile):
    """A SoundFile read front to back, block by block. python-soundfile seeks after every read, to where the
    read ended; on an MP3 that seek restarts libmpg123 mid-stream, which drops and garbles samples at every
    block boundary. Said not to be seekable, it reads straight on: the samples of one whole-file read."""

    def seekable(self) -> bool:
        return False


def stream(file: BinaryIO, rate: int = TARGET_RATE, block_frames: int = STREAM_BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """A recording of any length as mono float32 blocks at ``rate``, in memory that does not grow with its length:
    libsndfile decodes ``block_frames`` at a time, :func:`downmix` and soxr's streaming resampler follow.

    Laid end to end, the blocks are exactly the samples :func:`decode` and :func:`to_target` give for the whole
    recording (soxr's stream is bit-identical to its one-shot resampling; the down-mix is frame by frame).
    ``file`` is a seekable binary file. Raises AudioRejected, also part-way through: a file that breaks after
    its start, or samples that are not finite numbers (they would turn a model's output into NaN).
    """
    if file.seek(0, io.SEEK_END) == 0:
        raise AudioRejected("empty_file")
    file.seek(0)
    produced = 0
    try:
        with _ForwardReader(file) as f:
            source_rate = _check_format(f)
            resample = None
            if source_rate != rate:
                resample = soxr.ResampleStream(source_rate, rate, 1, dtype="float32", quality="HQ").resample_chunk
            while len(block := f.read(frames=block_frames, dtype="float32", always_2d=False)):
                if not np.isfinite(block).all():
                    raise AudioRejected("decode_error", "samples that are not finite numbers")
                mono = downmix(block) if resample is None else resample(downmix(block), last=False)
                produced += len(mono)
                yield mono
            if resample is not None:
                tail = resample(np.zeros(0, dtype=np.float32), last=True)
                produced += len(tail)
                yield tail
    except AudioRejected:
        raise
    except _DECODE_ERRORS as exc:
        raise AudioRejected("decode_error", _error_detail(exc)) from None
    if produced == 0:  # nothing decoded, or less than one sample at ``rate``
        raise AudioRejected("no_audio", "decoded to zero samples")


def encode_wav(mono: np.ndarray) -> bytes:
    """16-bit PCM WAV bytes (x 32768, rounded to nearest, clipped to the int16 range).

    The stdlib ``wave`` writer over a numpy conversion: libsndfile's virtual-IO round trip per clip cost
    about 10% of the whole conversion.
    """
    pcm = np.rint(mono * 32768.0)
    np.clip(pcm, -32768, 32767, out=pcm)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(TARGET_RATE)
        w.writeframes(pcm.astype("<i2").tobytes())
    return out.getvalue()


def load(data: bytes, expected_duration: float | None = None, max_seconds: float | None = None) -> DecodedAudio:
    """Decode, down-mix and resample one clip. ``expected_duration`` (from the release's duration table)
    detects truncated files; ``max_seconds`` bounds the work (see :func:`decode`). Raises AudioRejected."""
    samples, rate = decode(data, max_seconds)
    mono = to_target(samples, rate)
    level = _level_dbfs(mono)
    if math.isnan(level):
        raise AudioRejected("decode_error", "samples that are not finite numbers")
    decoded = DecodedAudio(mono, rate, 1 if samples.ndim == 1 else samples.shape[1], level)
    if expected_duration is not None and decoded.duration < expected_duration - TRUNCATION_TOLERANCE_S:
        raise AudioRejected("truncated", f"decoded {decoded.duration:.2f}s of {expected_duration:.2f}s")
    return decoded


def silence_problem(decoded: DecodedAudio) -> tuple[str, str] | None:
    if decoded.level_dbfs < SILENCE_DBFS:
        return "silent", f"RMS {decoded.level_dbfs:.1f} dBFS < {SILENCE_DBFS:.0f} dBFS"
    return None


def convert(data: bytes, expected_duration: float | None = None, max_seconds: float | None = None) -> ConvertedAudio:
    """Convert one clip (:func:`load`, refused if silent, encoded as WAV)."""
    decoded = load(data, expected_duration, max_seconds)
    problem = silence_problem(decoded)
    if problem:
        raise AudioRejected(*problem)
    return ConvertedAudio(encode_wav(decoded.mono), decoded.duration, decoded.source_rate, decoded.source_channels)


def wav_duration(header: bytes) -> float:
    """Duration of a PCM WAV from its first bytes (the header declares the data size; no samples needed)."""
    with wave.open(io.BytesIO(header)) as w:
        return w.getnframes() / w.getframerate()
