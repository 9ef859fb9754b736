"""Transcription with a NeMo CTC model (or the CTC head of a hybrid RNNT/CTC model), of recordings of any length.

    habla transcribe --model MODEL.nemo --out DST [--timestamps] [--confidence] INPUT…

INPUT: files, folders, glob patterns and NeMo manifests (habla.evaluation.inputs, which also says how untrusted
inputs are rejected); every input ends in exactly one line of ``transcripts.json`` or ``rejected.jsonl``, each
file in input order. Only a storage fault (an I/O error, an endpoint that stays down) stops the run (exit 1).

DST (local or ``s3://``, habla.core.layout.TranscribeLayout) receives ``transcripts.json``, a NeMo manifest
(``audio_filepath``, ``duration``, ``pred_text``; with ``--timestamps`` NeMo's ``word`` list of
``{word, start, end, start_offset, end_offset}``; with ``--confidence`` ``word_confidence``, one value per
word; the input manifest's own fields are kept, so a manifest with ``text`` comes back ready to score),
``summary.json`` (files, audio hours, seconds, the real-time factor, the device) and ``rejected.jsonl``
(``audio_filepath``, ``reason``, ``detail``; ``manifest`` and ``line`` for a manifest's line).

Long recordings are cut into windows as they are read (habla.evaluation.windows); the model is loaded and its
CTC or transducer head run by habla.evaluation.runners.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from habla.core import jsonl, state, storage
from habla.core.errors import HablaError
from habla.core.layout import TranscribeLayout
from habla.core.progress import Progress
from habla.evaluation import subtitles
from habla.evaluation.inputs import AudioInput, collect_inputs, stream_audio
from habla.evaluation.runners import CtcRunner, device_name, load_model, make_runner, nemo_output_to
from habla.evaluation.windows import CONTEXT_S, WINDOW_S, WindowRule, cut_windows
from habla.speech import audio

log = logging.getLogger("habla.transcribe")


@dataclass
class Transcript:
    """A recording's transcript (``pred_text``) and, when asked for, its words' timestamps and confidences."""

    uri: str
    duration: float
    text: str
    words: list[dict] | None = None
    word_confidence: list[float] | None = None


@dataclass
class _Recording:
    """A recording being transcribed: its kept frame outputs so far, or why it was rejected."""

    input: AudioInput
    pieces: list = field(default_factory=list)
    windows: int = 0
    samples: int = 0
    read: bool = False  # every window cut
    rejection: dict | None = None

    @property
    def done(self) -> bool:
        return self.rejection is not None or (self.read and len(self.pieces) == self.windows)


def transcribe_inputs(
    runner: CtcRunner,
    inputs: Iterable[AudioInput],
    batch_size: int = 16,
    window_s: float = WINDOW_S,
    context_s: float = CONTEXT_S,
    rejected: list[dict] | None = None,
    total: int | None = None,
) -> Iterator[tuple[AudioInput, Transcript]]:
    """Transcribe recordings in order, each read as a stream and cut into windows as it is read; windows of
    several recordings share a batch.

    An input that cannot be transcribed (its ``problem``, audio rejected while it is read, even part-way, or
    a model output that is not finite) is appended to ``rejected`` (``rejected.jsonl`` lines, in input order)
    and skipped; with ``rejected=None`` it raises HablaError.
    """
    import torch

    rule = WindowRule.of(runner.frame_samples, window_s, context_s, runner.rate)
    batch: list[tuple[int, np.ndarray, int, int | None]] = []  # (recording, window samples, skip, keep)
    recordings: dict[int, _Recording] = {}  # in input order, until written
    progress = Progress(total or 0, "transcribe", unit="file")

    def reject(index: int, reason: str, detail: str) -> None:
        recording = recordings[index]
        if rejected is None:
            raise HablaError(f"{recording.input.uri}: {audio.AudioRejected(reason, detail)}")
        recording.rejection = recording.input.rejected(reason, detail)
        recording.pieces.clear()
        batch[:] = [entry for entry in batch if entry[0] != index]

    def run_batch() -> None:
        outputs = runner.frame_outputs([samples for _, samples, _, _ in batch])
        for (index, _, skip, keep), frames in zip(list(batch), outputs):
            recording = recordings[index]
            if recording.rejection is not None:
                continue
            if frames is None:
                reject(index, "non_finite_output", "the model's log-probabilities for it are not finite numbers")
                continue
            recording.pieces.append(frames[skip:] if keep is None else frames[skip : skip + keep])
        batch.clear()

    def finished() -> Iterator[tuple[AudioInput, Transcript]]:
        while recordings and recordings[next(iter(recordings))].done:
            recording = recordings.pop(next(iter(recordings)))
            if recording.rejection is not None:
                rejected.append(recording.rejection)
                progress.update(1)
                continue
            duration = recording.samples / runner.rate
            text, words, confidence = runner.decode(torch.cat(recording.pieces))
            progress.update(1, duration)
            yield recording.input, Transcript(recording.input.uri, duration, text, words, confidence)

    for index, item in enumerate(inputs):
        recording = recordings[index] = _Recording(item)
        if item.problem is not None:
            reject(index, *item.problem)
            continue
        try:
            with stream_audio(item.uri, runner.rate) as blocks:
                for window in cut_windows(blocks, rule):
                    batch.append((index, window.samples, window.skip, window.keep))
                    recording.windows, recording.samples = recording.windows + 1, window.end
                    if len(batch) >= batch_size:
                        run_batch()
                        yield from finished()
        except audio.AudioRejected as exc:
            reject(index, exc.reason, exc.detail)
            continue
        recording.read = True
    if batch:
        run_batch()
    yield from finished()
    progress.close()


def _utf8(json_text: str) -> bytes:
    """JSON text as UTF-8; a lone surrogate (a file name of undecodable bytes, a manifest's ``\\udcff``) becomes
    its JSON escape, which reads back as the same string, rather than failing the whole write."""
    return json_text.encode("utf-8", "backslashreplace")


def transcribe(
    model: str,
    inputs: Sequence[str],
    out: str,
    *,
    batch_size: int = 16,
    timestamps: bool = False,
    confidence: bool = False,
    window_s: float = WINDOW_S,
    context_s: float = CONTEXT_S,
    decoder: str | None = None,
) -> dict:
    """``habla transcribe``: write ``transcripts.json``, ``summary.json`` and ``rejected.jsonl`` under ``out``.

    Returns the summary. Raises HablaError for a bad model, option or output, before transcribing, and when
    no input at all could be transcribed (after writing rejected.jsonl, which says why).
    """
    if window_s <= 0 or context_s < 0:
        raise HablaError("--window must be > 0 and --context >= 0 seconds")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HablaError(f"--batch-size must be a positive integer (got {batch_size!r})")
    storage.check_writable_root(out)
    recordings = collect_inputs(inputs)
    started = time.monotonic()
    layout = TranscribeLayout(out)
    with nemo_output_to(layout.log):  # NeMo's restore messages go to transcribe.log, not around the answer
        restored = load_model(model)
    runner = make_runner(restored, decoder, timestamps=timestamps, confidence=confidence)
    loaded = time.monotonic()
    log.info("transcribing %d input(s) with %s on %s", len(recordings), model, device_name(runner.model))
    rejected: list[dict] = []
    lines = []
    audio_seconds = 0.0
    for item, result in transcribe_inputs(
        runner, recordings, batch_size, window_s, context_s, rejected=rejected, total=len(recordings)
    ):
        line = {**item.fields, "audio_filepath": item.uri, "duration": round(result.duration, 3),
                "pred_text": result.text}  # fmt: skip
        if result.words is not None:
            line["word"] = result.words
        if result.word_confidence is not None:
            line["word_confidence"] = result.word_confidence
        lines.append(line)
        audio_seconds += result.duration
    seconds = time.monotonic() - loaded
    summary = {
        "model": model,
        "files": len(lines),
        "rejected": len(rejected),
        "audio_hours": round(audio_seconds / 3600, 6),
        "transcribe_seconds": round(seconds, 3),
        "model_load_seconds": round(loaded - started, 3),
        "rtfx": round(audio_seconds / seconds, 2) if seconds > 0 else None,
        "rtf": round(seconds / audio_seconds, 5) if audio_seconds > 0 else None,
        "device": device_name(runner.model),
        "decoder": runner.decoder,
        "window_seconds": window_s,
        "context_seconds": context_s,
    }
    storage.write_bytes(layout.transcripts, _utf8(jsonl.dumps(lines)))
    if timestamps:  # one SRT and one WebVTT file per recording, in input order
        for index, line in enumerate(lines, 1):
            storage.write_bytes(
                layout.subtitles(index, line["audio_filepath"], "srt"), _utf8(subtitles.srt(line["word"]))
            )
            storage.write_bytes(
                layout.subtitles(index, line["audio_filepath"], "vtt"), _utf8(subtitles.vtt(line["word"]))
            )
    storage.write_bytes(layout.rejected, _utf8(jsonl.dumps(rejected)))
    storage.write_bytes(layout.summary, _utf8(state.dumps(summary, indent=2)))
    if not lines:
        raise HablaError(
            f"no input could be transcribed ({len(rejected)} rejected, with reasons: see {layout.rejected})"
        )
    return summary
