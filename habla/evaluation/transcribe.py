"""Transcription with a NeMo CTC model (or the CTC head of a hybrid RNNT/CTC model), of recordings of any length.

    habla transcribe --model MODEL.nemo --out DST [--timestamps] [--confidence] INPUT…

INPUT: audio files, folders (searched recursively for the audio formats libsndfile reads), glob patterns
(``clips/*.mp3``) and NeMo manifests (``.json``/``.jsonl``, one ``{"audio_filepath": …}`` per line; a relative
path is relative to the manifest), local or ``s3://``. Audio is decoded in-process by libsndfile, down-mixed
and resampled to the model's rate by soxr (habla.data.audio), never by a subprocess.

DST (local or ``s3://``, habla.core.layout.TranscribeLayout) receives ``transcripts.json``, a NeMo manifest
(``audio_filepath``, ``duration``, ``pred_text``; with ``--timestamps`` NeMo's ``word`` list of
``{word, start, end, start_offset, end_offset}``; with ``--confidence`` ``word_confidence``, one value per
word; the input manifest's own fields are kept, so a manifest with ``text`` comes back ready to score),
``summary.json`` (files, audio hours, seconds, the real-time factor, the device) and ``rejected.jsonl``
(inputs that could not be read, with a reason: every input is in one file or the other).

Long recordings: the model sees windows of ``WINDOW_S`` seconds, each with ``CONTEXT_S`` seconds of audio
on either side; only each window's middle frames of log-probabilities are kept and the pieces, laid end to
end, are decoded once by the model's own CTC decoding (which computes NeMo's timestamps and confidence).
Memory therefore depends on the window, not on the recording: a 10-minute file costs 30 windows of 28 s.
This is the rule of NeMo's buffered CTC inference (``FrameBatchASR``: buffers, keep the middle tokens,
per-buffer feature normalization); habla does not call ``FrameBatchASR`` itself because it needs a BPE
tokenizer (habla's default models are character-based), reads files from paths, and returns text without
timestamps or confidence. A recording no longer than one window plus its context is one window: the same
forward pass and decoding as NeMo's ``model.transcribe``.

Supported models: CTC (``EncDecCTCModel``, ``EncDecCTCModelBPE``) and hybrid RNNT/CTC (their CTC head);
a transducer-only or attention-decoder model is refused with a one-line error.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from habla.core import jsonl, storage
from habla.core.errors import HablaError, one_line
from habla.core.layout import TranscribeLayout
from habla.core.progress import Progress
from habla.data import audio
from habla.training import manifests

log = logging.getLogger("habla.transcribe")

WINDOW_S = 20.0  # seconds of audio whose frames each window keeps
CONTEXT_S = 4.0  # seconds of audio seen on each side of a window's kept part
MANIFEST_SUFFIXES = (".json", ".jsonl")
_GLOB_CHARS = "*?["


@dataclass
class AudioInput:
    """One recording to transcribe: where it is, and the fields of its manifest line (if it came from one)."""

    uri: str
    fields: dict = field(default_factory=dict)


@dataclass
class Transcript:
    """A recording's transcript (``pred_text``) and, when asked for, its words' timestamps and confidences."""

    uri: str
    duration: float
    text: str
    words: list[dict] | None = None
    word_confidence: list[float] | None = None


# ------------------------------------------------------------------------------------------------- inputs


def audio_extensions() -> tuple[str, ...]:
    """File extensions of the formats libsndfile reads here (``.wav``, ``.flac``, ``.mp3``, ``.ogg`` …)."""
    import soundfile

    extensions = {f".{name.lower()}" for name in soundfile.available_formats()}
    return tuple(sorted(extensions | {".wav", ".mp3", ".oga", ".opus"}))


def _is_audio(uri: str, extensions: tuple[str, ...]) -> bool:
    return storage.name(uri).lower().endswith(extensions) and not storage.name(uri).startswith(".")


def _is_folder(uri: str) -> bool:
    if not storage.is_s3(uri):
        return Path(uri).is_dir()
    return next(iter(storage.list_files(uri)), None) is not None and not storage.exists(uri)


def _expand_glob(pattern: str) -> list[str]:
    if not storage.is_s3(pattern):
        return sorted(glob.glob(pattern, recursive=True))
    # S3: list below the pattern's fixed prefix, then match the keys.
    fixed = pattern[: min(pattern.find(c) for c in _GLOB_CHARS if c in pattern)]
    prefix = fixed.rsplit("/", 1)[0]
    return [info.uri for info in storage.list_files(prefix) if fnmatch.fnmatchcase(info.uri, pattern)]


def _manifest_inputs(uri: str) -> list[AudioInput]:
    """The lines of a NeMo manifest; only ``audio_filepath`` is required (relative to the manifest's folder)."""
    out = []
    for number, line in jsonl.lines(manifests.read_manifest_text(uri)):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HablaError(f"{uri}: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("audio_filepath"), str):
            raise HablaError(f"{uri}: line {number} has no audio_filepath")
        audio_uri = manifests._resolve(entry["audio_filepath"], uri)
        out.append(AudioInput(audio_uri if storage.is_s3(audio_uri) else os.path.normpath(audio_uri), entry))
    if not out:
        raise HablaError(f"{uri}: manifest is empty")
    return out


def collect_inputs(inputs: Sequence[str]) -> list[AudioInput]:
    """The recordings named by ``inputs`` (files, folders, globs, manifests), in order, each once.

    Raises HablaError for an input that names nothing (a missing file, an empty folder, a glob without a match).
    """
    extensions = audio_extensions()
    found: list[AudioInput] = []
    for item in inputs:
        if any(c in item for c in _GLOB_CHARS):
            matches = [m for m in _expand_glob(item) if _is_audio(m, extensions) or m.endswith(MANIFEST_SUFFIXES)]
            if not matches:
                raise HablaError(f"{item}: no audio file matches")
            for match in matches:
                found += _manifest_inputs(match) if match.endswith(MANIFEST_SUFFIXES) else [AudioInput(match)]
        elif item.endswith(MANIFEST_SUFFIXES):
            found += _manifest_inputs(item)
        elif _is_folder(item):
            files = [i.uri for i in storage.list_files(item) if _is_audio(i.uri, extensions)]
            if not files:
                raise HablaError(f"{item}: no audio file in this folder ({', '.join(extensions[:6])} …)")
            found += [AudioInput(f) for f in files]
        elif storage.exists(item):
            found.append(AudioInput(item))
        else:
            raise HablaError(f"{item}: no such file, folder or manifest")
    unique: dict[str, AudioInput] = {}
    for entry in found:
        unique.setdefault(storage.absolute(entry.uri), entry)
    return list(unique.values())


def read_audio(uri: str, rate: int) -> np.ndarray:
    """A recording as mono float32 samples at ``rate`` (libsndfile decodes, soxr resamples). Raises
    audio.AudioRejected for audio that cannot be read."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise audio.AudioRejected("missing_file", uri) from None
    samples, source_rate = audio.decode(data)
    if rate == audio.TARGET_RATE:
        return audio.to_target(samples, source_rate)
    import soxr

    mono = samples if samples.ndim == 1 else samples.mean(axis=1)
    return np.ascontiguousarray(soxr.resample(mono, source_rate, rate, quality="HQ"), dtype=np.float32)


# -------------------------------------------------------------------------------------------------- model


def load_model(model_uri: str, device: str | None = None):
    """Restore a ``.nemo`` (local or ``s3://``) for inference on ``device`` (default: GPU when there is one)."""
    import torch
    from nemo.collections.asr.models import ASRModel

    local = manifests.fetch_model(model_uri, "--model")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = ASRModel.restore_from(str(local), map_location=torch.device(device))
    except Exception as exc:
        raise HablaError(f"--model {model_uri}: cannot restore a NeMo model ({one_line(exc)})") from None
    model.eval()
    return model


def device_name(model) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``: where the model runs, for reports."""
    import torch

    device = next(model.parameters()).device
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


class CtcRunner:
    """The CTC path of a NeMo model: log-probabilities of audio windows, and NeMo's CTC decoding of them."""

    def __init__(self, model, timestamps: bool = False, confidence: bool = False) -> None:
        from nemo.collections.asr.models import EncDecCTCModel
        from omegaconf import OmegaConf, open_dict

        self.model = model
        self.hybrid = hasattr(model, "ctc_decoder") and hasattr(model, "ctc_decoding")
        if not (self.hybrid or isinstance(model, EncDecCTCModel)):
            raise HablaError(
                f"{type(model).__name__}: habla transcribes with CTC models and with the CTC head of hybrid "
                "RNNT/CTC models; this model has neither"
            )
        source = model.cfg.aux_ctc.decoding if self.hybrid else model.cfg.decoding
        decoding = OmegaConf.create(OmegaConf.to_container(source, resolve=True))
        with open_dict(decoding):
            decoding.strategy = "greedy_batch"
            decoding.compute_timestamps = bool(timestamps)
            if confidence:
                # Per-token confidence from NeMo, aggregated per word below: NeMo 3.0's own per-word path
                # fails on character models (it joins token ids as strings).
                decoding.confidence_cfg = {"preserve_frame_confidence": True, "preserve_token_confidence": True,
                                           "exclude_blank": True, "aggregation": "min",
                                           "method_cfg": {"name": "max_prob"}}  # fmt: skip
        if self.hybrid:
            model.change_decoding_strategy(decoding_cfg=decoding, decoder_type="ctc", verbose=False)
            self.decoding = model.ctc_decoding
        else:
            model.change_decoding_strategy(decoding, verbose=False)
            self.decoding = model.decoding
        self.timestamps, self.confidence = timestamps, confidence
        # As NeMo's transcribe() does: no dither (random noise added to the features) and no padding of the
        # features to a multiple of 16 frames.
        featurizer = getattr(model.preprocessor, "featurizer", None)
        if featurizer is not None:
            featurizer.dither = 0.0
            featurizer.pad_to = 0
        self.rate = int(model.cfg.sample_rate)
        self.window_stride = float(model.cfg.preprocessor.window_stride)
        self.subsampling = int(getattr(model.encoder, "subsampling_factor", 1))
        # Samples per output frame: windows start on a frame boundary, so frames line up across windows.
        self.frame_samples = round(self.window_stride * self.rate) * self.subsampling

    @property
    def device(self):
        return next(self.model.parameters()).device

    def log_probs(self, windows: Sequence[np.ndarray]) -> list:
        """Log-probabilities (frames x vocabulary, on the CPU) of each window, computed as one padded batch."""
        import torch

        lengths = torch.tensor([len(w) for w in windows], dtype=torch.long)
        batch = torch.zeros(len(windows), int(lengths.max()))
        for i, w in enumerate(windows):
            batch[i, : len(w)] = torch.from_numpy(w)
        self.model.eval()  # NeMo's transcribe() leaves the encoder in training mode (its unfreeze() calls train())
        with torch.inference_mode():
            signal, signal_len = batch.to(self.device), lengths.to(self.device)
            if self.hybrid:
                encoded, encoded_len = self.model.forward(input_signal=signal, input_signal_length=signal_len)
                logits = self.model.ctc_decoder(encoder_output=encoded)
            else:
                logits, encoded_len, _ = self.model.forward(input_signal=signal, input_signal_length=signal_len)
        return [logits[i, : int(encoded_len[i])].float().cpu() for i in range(len(windows))]

    def decode(self, logits) -> tuple[str, list[dict] | None, list[float] | None]:
        """NeMo's CTC decoding of one recording's log-probabilities: text, word timestamps, word confidences."""
        import torch
        from nemo.collections.asr.parts.utils.timestamp_utils import process_timestamp_outputs

        if logits.shape[0] == 0:  # shorter than one output frame
            return "", [] if self.timestamps else None, [] if self.confidence else None
        want_hypothesis = self.timestamps or self.confidence
        (hyp,) = self.decoding.ctc_decoder_predictions_tensor(
            logits[None], decoder_lengths=torch.tensor([logits.shape[0]]), return_hypotheses=want_hypothesis
        )
        text = hyp.text if hasattr(hyp, "text") else str(hyp)
        words = confidence = None
        if self.timestamps:
            (hyp,) = process_timestamp_outputs([hyp], self.subsampling, self.window_stride)
            words = [{"word": w["word"], "start": round(float(w["start"]), 3), "end": round(float(w["end"]), 3),
                      "start_offset": int(w["start_offset"]), "end_offset": int(w["end_offset"])}
                     for w in hyp.timestamp.get("word", [])]  # fmt: skip
        if self.confidence:
            if self.decoding.tokenizer_type == "char":
                values = self.decoding._aggregate_token_confidence_chars(text.split(), hyp.token_confidence or [])
            else:
                values = self.decoding._aggregate_token_confidence(hyp)
            confidence = [round(float(c), 4) for c in values]
        return text, words, confidence


def plan_windows(samples: int, frame_samples: int, window_s: float, context_s: float, rate: int):
    """The windows of a recording: ``(first sample, last sample, first kept frame, kept frames or None)``.

    Window k keeps output frames [k·W, (k+1)·W) (W = frames per ``window_s``), computed from the audio
    ``context_s`` before and after; the last window keeps every frame from its start to the end.
    """
    kept = max(1, round(window_s * rate / frame_samples))  # frames kept per window
    context = round(context_s * rate / frame_samples) * frame_samples
    if samples <= (kept * frame_samples) + 2 * context:
        return [(0, samples, 0, None)]
    plans = []
    first = 0
    while True:
        start = max(0, first * frame_samples - context)
        end = (first + kept) * frame_samples + context
        last = end >= samples
        plans.append((start, min(end, samples), first - start // frame_samples, None if last else kept))
        if last:
            return plans
        first += kept


# --------------------------------------------------------------------------------------------- transcribe


def transcribe_inputs(
    runner: CtcRunner,
    inputs: Iterable[AudioInput],
    batch_size: int = 16,
    window_s: float = WINDOW_S,
    context_s: float = CONTEXT_S,
    rejected: list[dict] | None = None,
    total: int | None = None,
) -> Iterator[tuple[AudioInput, Transcript]]:
    """Transcribe recordings in order; windows of several recordings share a batch.

    A recording that cannot be read is appended to ``rejected`` (``audio_filepath``, ``reason``, ``detail``)
    and skipped; with ``rejected=None`` it raises HablaError.
    """
    import torch

    pending: list[tuple[int, np.ndarray, int, int | None]] = []  # (recording, window samples, skip, keep)
    open_: dict[int, dict] = {}  # recording -> {"input", "duration", "pieces": {window: logits}, "windows": n}
    order: list[int] = []
    progress = Progress(total or 0, "transcribe", unit="file")

    def run_batch(batch):
        outputs = runner.log_probs([w for _, w, _, _ in batch])
        for (rec, _, skip, keep), logits in zip(batch, outputs):
            piece = logits[skip:] if keep is None else logits[skip : skip + keep]
            open_[rec]["pieces"].append(piece)

    def finished():
        while order and len(open_[order[0]]["pieces"]) == open_[order[0]]["windows"]:
            state = open_.pop(order.pop(0))
            text, words, confidence = runner.decode(torch.cat(state["pieces"]))
            progress.update(1, state["duration"])
            yield state["input"], Transcript(state["input"].uri, state["duration"], text, words, confidence)

    for index, item in enumerate(inputs):
        try:
            samples = read_audio(item.uri, runner.rate)
        except audio.AudioRejected as exc:
            if rejected is None:
                raise HablaError(f"{item.uri}: {exc}") from None
            rejected.append({"audio_filepath": item.uri, "reason": exc.reason, "detail": exc.detail})
            continue
        except Exception as exc:  # noqa: BLE001 - storage errors: access denied, endpoint down
            if rejected is None:
                raise
            rejected.append({"audio_filepath": item.uri, "reason": "unreadable", "detail": one_line(exc)})
            continue
        duration = len(samples) / runner.rate
        plans = plan_windows(len(samples), runner.frame_samples, window_s, context_s, runner.rate)
        open_[index] = {"input": item, "duration": duration, "pieces": [], "windows": len(plans)}
        order.append(index)
        for start, end, skip, keep in plans:
            pending.append((index, samples[start:end], skip, keep))
            if len(pending) >= batch_size:
                run_batch(pending)
                pending = []
                yield from finished()
    if pending:
        run_batch(pending)
    yield from finished()
    progress.close()


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
) -> dict:
    """``habla transcribe``: write ``transcripts.json``, ``summary.json`` and ``rejected.jsonl`` under ``out``.

    Returns the summary. Raises HablaError for a bad model, input or output, before transcribing.
    """
    if window_s <= 0 or context_s < 0:
        raise HablaError("--window must be > 0 and --context >= 0 seconds")
    storage.check_writable_root(out)
    recordings = collect_inputs(inputs)
    started = time.monotonic()
    runner = CtcRunner(load_model(model), timestamps=timestamps, confidence=confidence)
    loaded = time.monotonic()
    log.info("transcribing %d recording(s) with %s on %s", len(recordings), model, device_name(runner.model))
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
        "window_seconds": window_s,
        "context_seconds": context_s,
    }
    layout = TranscribeLayout(out)
    storage.write_text(layout.transcripts, jsonl.dumps(lines))
    storage.write_text(layout.rejected, jsonl.dumps(rejected))
    storage.write_text(layout.summary, json.dumps(summary, indent=2) + "\n")
    if not lines:
        raise HablaError(f"no input could be read ({len(rejected)} rejected: see {layout.rejected})")
    return summary
