"""Transcription with a NeMo CTC model (or the CTC head of a hybrid RNNT/CTC model), of recordings of any length.

    habla transcribe --model MODEL.nemo --out DST [--timestamps] [--confidence] INPUT…

INPUT: audio files, folders (searched recursively for the audio formats libsndfile reads), glob patterns
(``clips/*.mp3``) and NeMo manifests (``.json``/``.jsonl``, one ``{"audio_filepath": …}`` per line; a relative
path is relative to the manifest), local or ``s3://``. A name that exists is taken literally, glob characters
and all (``interview [part 1].wav``); only a name that does not exist is expanded as a pattern. Each file named
is one recording as often as it is named: a repeated manifest line or argument is transcribed again.

Inputs are untrusted. A FIFO, a device (a symlink to ``/dev/zero``), a folder or a socket named as a recording
is rejected (``not_a_file``) without being read, so is a missing, unreadable or undecodable one, and the run goes
on: every input ends in exactly one line of ``transcripts.json`` or ``rejected.jsonl``, each file in input order.
Only a storage fault (an I/O error, an endpoint that stays down) stops the run (exit 1).

DST (local or ``s3://``, habla.core.layout.TranscribeLayout) receives ``transcripts.json``, a NeMo manifest
(``audio_filepath``, ``duration``, ``pred_text``; with ``--timestamps`` NeMo's ``word`` list of
``{word, start, end, start_offset, end_offset}``; with ``--confidence`` ``word_confidence``, one value per
word; the input manifest's own fields are kept, so a manifest with ``text`` comes back ready to score),
``summary.json`` (files, audio hours, seconds, the real-time factor, the device) and ``rejected.jsonl``
(``audio_filepath``, ``reason``, ``detail``; ``manifest`` and ``line`` for a manifest's line).

Audio is decoded in-process by libsndfile, down-mixed and resampled to the model's rate by soxr, as a stream
(habla.speech.audio.stream), never by a subprocess; windows are cut from the stream as it is read.

Long recordings: the model sees windows of ``WINDOW_S`` seconds, each with ``CONTEXT_S`` seconds of audio
on either side; only each window's middle frames are kept and the pieces, laid end to end, are decoded once
by the model's own CTC decoding (which computes NeMo's timestamps and confidence). What is held of a recording
is the window being read and one label per output frame, so memory depends on the window, not on the recording:
a 10-minute file costs 30 windows of 28 s. (With ``--confidence`` each frame's log-probabilities are kept
instead: 25 MB an hour for ``tiny_ctc_char``, about 185 MB for a 1,024-token BPE model.)
This is the rule of NeMo's buffered CTC inference (``FrameBatchASR``: buffers, keep the middle tokens,
per-buffer feature normalization); habla does not call ``FrameBatchASR`` itself because it needs a BPE
tokenizer (habla's default models are character-based), reads files from paths, and returns text without
timestamps or confidence. A recording no longer than one window plus its context is one window: the same
forward pass and decoding as NeMo's ``model.transcribe``.

Supported models: CTC (``EncDecCTCModel``, ``EncDecCTCModelBPE``), hybrid RNNT/CTC (either head: ``--decoder
rnnt``, their default and what NVIDIA's model cards report, or ``--decoder ctc``) and transducers
(``EncDecRNNTModel[BPE]``). The transducer head (:class:`RnntRunner`) decodes the encoder's frames, cut from
windows by the same rule and laid end to end, with NeMo's greedy RNNT decoding; a recording of one window is
NeMo's ``model.transcribe``. Timestamps and confidence come from the CTC head. Any other class, a file that
is not a ``.nemo`` (corrupt, truncated, something else) and a model whose outputs are
not finite numbers are refused with a one-line error (exit 2) before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import logging
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from habla.core import jsonl, progress, state, storage, untrusted
from habla.core.errors import Fault, HablaError, one_line
from habla.core.layout import TranscribeLayout
from habla.core.progress import Progress
from habla.evaluation import subtitles
from habla.speech import audio, manifests, models

log = logging.getLogger("habla.transcribe")

WINDOW_S = 20.0  # seconds of audio whose frames each window keeps
CONTEXT_S = 4.0  # seconds of audio seen on each side of a window's kept part
MANIFEST_SUFFIXES = (".json", ".jsonl")
_GLOB_CHARS = "*?["
#: The largest manifest read: a manifest of a million recordings is about 300 MB.
MAX_MANIFEST_BYTES = 1 << 30
#: The largest ``model_config.yaml`` read from a ``.nemo`` (a real one is a few kB).
MAX_MODEL_CONFIG_BYTES = 16 << 20
#: The classes CtcRunner runs: CTC models, and hybrid RNNT/CTC models through their CTC head.
CTC_MODELS = ("EncDecCTCModel", "EncDecCTCModelBPE")
HYBRID_MODELS = ("EncDecHybridRNNTCTCModel", "EncDecHybridRNNTCTCBPEModel")
TRANSDUCER_MODELS = ("EncDecRNNTModel", "EncDecRNNTBPEModel")
DECODERS = ("rnnt", "ctc")


@dataclass
class AudioInput:
    """One recording to transcribe: where it is, the fields of its manifest line and which line it is (if it
    came from one) and, for an input found unusable before it is read, why (``problem``: reason, detail)."""

    uri: str
    fields: dict = field(default_factory=dict)
    origin: dict = field(default_factory=dict)
    problem: tuple[str, str] | None = None

    def rejected(self, reason: str, detail: str = "") -> dict:
        """Its line of ``rejected.jsonl``."""
        return {"audio_filepath": self.uri or None, **self.origin, "reason": reason, "detail": detail}


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
        return os.path.isdir(uri)
    return next(iter(storage.list_files(uri)), None) is not None and not storage.exists(uri)


def _exists(uri: str) -> bool:
    """Whether something of this very name exists (a dangling symlink or a FIFO does)."""
    return storage.exists(uri) if storage.is_s3(uri) else os.path.lexists(uri)


def _expand_glob(pattern: str) -> list[str]:
    if not storage.is_s3(pattern):
        return sorted(glob.glob(pattern, recursive=True))
    # S3: list below the pattern's fixed prefix, then match the keys.
    fixed = pattern[: min(pattern.find(c) for c in _GLOB_CHARS if c in pattern)]
    prefix = fixed.rsplit("/", 1)[0]
    return [info.uri for info in storage.list_files(prefix) if fnmatch.fnmatchcase(info.uri, pattern)]


def _open_problem(exc: BaseException) -> tuple[str, str] | None:
    """Why an input could not be opened, as a rejection (reason, detail); None for a storage fault, which stops
    the run (exit 1) rather than reject an input that may be sound."""
    if isinstance(exc, untrusted.NotAFile):
        return "not_a_file", str(exc)
    if isinstance(exc, untrusted.TooLarge):
        return "too_large", str(exc)
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)) or storage.error_code(exc) == "NoSuchBucket":
        return "missing_file", "no such file"
    if isinstance(exc, PermissionError) or storage.error_code(exc) in ("AccessDenied", "403"):
        return "unreadable", one_line(exc)
    if isinstance(exc, (ValueError, HablaError)) or getattr(exc, "errno", None) == errno.ENAMETOOLONG:
        return "bad_path", one_line(exc)  # a NUL byte, a name too long, "s3://" without a bucket
    return None


@contextlib.contextmanager
def _opening(uri: str) -> Iterator[None]:
    """Turns what opening an untrusted input raises into audio.AudioRejected (with its reason) or a Fault."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - OSError, NotAFile, botocore's errors: sorted by _open_problem
        problem = _open_problem(exc)
        if problem is None:
            raise Fault(f"{uri}: cannot read it ({one_line(exc, with_type=True)})") from None
        raise audio.AudioRejected(*problem) from None


def _manifest_line(manifest: str, number: int, line: str) -> AudioInput:
    """One line of a manifest: a recording, or a rejected input when it names none."""
    origin = {"manifest": manifest, "line": number}
    try:
        entry = jsonl.loads_line(line)
    except (ValueError, RecursionError) as exc:
        return AudioInput("", origin=origin, problem=("bad_manifest_line", f"not JSON ({one_line(exc)})"))
    path = entry.get("audio_filepath") if isinstance(entry, dict) else None
    if not isinstance(path, str) or not path.strip():
        return AudioInput("", origin=origin, problem=("bad_manifest_line", "no audio_filepath"))
    uri = manifests.resolve_audio(path, manifest)
    return AudioInput(uri if storage.is_s3(uri) else os.path.normpath(uri), entry, origin)


def _manifest_inputs(uri: str) -> list[AudioInput]:
    """The lines of a NeMo manifest, one recording each; only ``audio_filepath`` is required (relative to the
    manifest's folder). A manifest that cannot be read is one rejected input."""
    try:
        with _opening(uri):
            data = untrusted.read_capped(uri, MAX_MANIFEST_BYTES)
        text = data.decode("utf-8")
    except audio.AudioRejected as exc:
        return [AudioInput(uri, problem=(exc.reason, exc.detail))]
    except UnicodeDecodeError:
        return [AudioInput(uri, problem=("bad_manifest", "not UTF-8 text"))]
    found = [_manifest_line(uri, number, line) for number, line in jsonl.lines(text)]
    return found or [AudioInput(uri, problem=("bad_manifest", "no line"))]


def _folder_inputs(folder: str, extensions: tuple[str, ...]) -> list[AudioInput]:
    """A folder's audio files, recursively, in lexical order: every entry with an audio file's name (a FIFO, a
    link to a device or a dangling link among them, rejected when read), but not the folders it holds."""
    if storage.is_s3(folder):
        names = [info.uri for info in storage.list_files(folder)]
    else:
        names = [str(p) for p in sorted(Path(folder).rglob("*")) if not (p.is_dir() and not p.is_symlink())]
    found = [AudioInput(name) for name in names if _is_audio(name, extensions)]
    detail = f"no audio file in this folder ({', '.join(extensions[:6])} …)"
    return found or [AudioInput(folder, problem=("empty_folder", detail))]


def _file_inputs(uri: str) -> list[AudioInput]:
    """A file named as an input: a manifest's lines, or the file itself as a recording."""
    return _manifest_inputs(uri) if uri.endswith(MANIFEST_SUFFIXES) else [AudioInput(uri)]


def _named_by(item: str, extensions: tuple[str, ...]) -> list[AudioInput]:
    """What one INPUT names: a folder's audio files, a manifest's lines, a file itself, or, for a name that
    does not exist, what it matches as a glob pattern; a name that names nothing is one rejected input."""
    if _is_folder(item):
        return _folder_inputs(item, extensions)
    if _exists(item):
        return _file_inputs(item)
    if not any(c in item for c in _GLOB_CHARS):
        return [AudioInput(item, problem=("missing_file", "no such file, folder or manifest"))]
    matches = [m for m in _expand_glob(item) if _is_audio(m, extensions) or m.endswith(MANIFEST_SUFFIXES)]
    if not matches:
        return [AudioInput(item, problem=("missing_file", "no such file, and no audio file matches it as a pattern"))]
    return [entry for match in matches for entry in _file_inputs(match)]


def collect_inputs(inputs: Sequence[str]) -> list[AudioInput]:
    """The recordings named by ``inputs`` (files, folders, globs, manifests), in order, each as often as it is
    named. What names no recording (a missing file, an empty folder, a manifest line that is not JSON) is in
    the list too, with its ``problem``: every input is accounted for."""
    extensions = audio_extensions()
    return [entry for item in inputs for entry in _named_by(item, extensions)]


@contextlib.contextmanager
def open_recording(uri: str) -> Iterator[BinaryIO]:
    """A recording as a seekable binary file: a local one only if it is a regular file (a FIFO would block for
    ever, a link to ``/dev/zero`` never end), an S3 object downloaded to a temporary file (libsndfile seeks).

    Raises audio.AudioRejected (missing, not a file, unreadable) or Fault (a storage fault).
    """
    with contextlib.ExitStack() as stack:
        with _opening(uri):
            if storage.is_s3(uri):
                local = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="habla-transcribe-")), "audio")
                storage.download_file(uri, local)
                file = stack.enter_context(open(local, "rb"))
            else:
                file = stack.enter_context(untrusted.open_regular(uri))
        yield file


@contextlib.contextmanager
def stream_audio(uri: str, rate: int) -> Iterator[Iterator[np.ndarray]]:
    """A recording of any length as a stream of mono float32 sample blocks at ``rate`` (audio.stream: decoded,
    down-mixed and resampled block by block). Raises audio.AudioRejected, also while the stream is read."""
    with open_recording(uri) as file:
        blocks = audio.stream(file, rate)
        try:
            yield blocks
        finally:
            blocks.close()  # libsndfile lets go of the file before it is closed


def read_audio(uri: str, rate: int) -> np.ndarray:
    """A (short) recording as mono float32 samples at ``rate``. Raises audio.AudioRejected for audio that
    cannot be read."""
    with stream_audio(uri, rate) as blocks:
        return np.concatenate(list(blocks))


# -------------------------------------------------------------------------------------------------- model


def _model_file(model_uri: str) -> Path:
    """A local copy of the model file; a local one that is not a regular file (a FIFO would block) is refused. A
    folder stands for the model it holds (habla.speech.models.model_in_folder)."""
    model_uri = models.model_in_folder(model_uri)
    if not storage.is_s3(model_uri):
        try:
            untrusted.open_regular(model_uri).close()
        except untrusted.NotAFile as exc:
            raise HablaError(f"--model {model_uri}: not a .nemo file but {exc}") from None
        except FileNotFoundError:
            raise HablaError(f"--model {model_uri}: no such file") from None
        except (PermissionError, NotADirectoryError, ValueError) as exc:
            raise HablaError(f"--model {model_uri}: cannot open it ({one_line(exc)})") from None
    return models.fetch_model(model_uri, "--model")


def _unsupported(name: str) -> str:
    return (
        f"{name}: habla transcribes with CTC models ({', '.join(CTC_MODELS)}), hybrid RNNT/CTC models "
        f"({', '.join(HYBRID_MODELS)}) and transducers ({', '.join(TRANSDUCER_MODELS)}), not with this class"
    )


def model_class(path: Path, model_uri: str) -> str | None:
    """The class a ``.nemo`` names (``target`` in its ``model_config.yaml``), read without restoring anything;
    None when it names none. HablaError for a file that is not a ``.nemo`` (not a tar, cut short, no config)."""
    import lzma
    import zlib

    import yaml

    not_nemo = f"--model {model_uri}: not a .nemo file"
    try:
        with tarfile.open(path, "r:*") as tar:
            member = next((m for m in tar if m.name.lstrip("./") == "model_config.yaml"), None)
            if member is None or not member.isfile() or member.size > MAX_MODEL_CONFIG_BYTES:
                raise HablaError(f"{not_nemo} (no model_config.yaml of at most {MAX_MODEL_CONFIG_BYTES} bytes in it)")
            config = yaml.safe_load(tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, yaml.YAMLError, ValueError) as exc:
        raise HablaError(f"{not_nemo} ({one_line(exc, with_type=True, first_line=True)})") from None
    if not isinstance(config, dict):
        raise HablaError(f"{not_nemo} (its model_config.yaml is not a mapping)")
    target = config.get("target") or config.get("_target_")
    return str(target).rsplit(".", 1)[-1] if target else None


@contextmanager
def nemo_output_to(log_uri: str):
    """Meanwhile, what this process prints (NeMo's and Lightning's restore messages, about 100 lines) goes to the
    file ``log_uri`` (local, or uploaded to ``s3://`` afterwards) rather than the console."""
    if storage.is_s3(log_uri):
        folder = tempfile.mkdtemp(prefix="habla-log-")
        local = os.path.join(folder, "nemo.log")
    else:
        Path(log_uri).parent.mkdir(parents=True, exist_ok=True)
        local = log_uri
    try:
        with progress.output_to(local):
            yield
    finally:
        if storage.is_s3(log_uri):
            with contextlib.suppress(Exception):
                storage.upload_file(Path(local), log_uri)
            shutil.rmtree(folder, ignore_errors=True)


def load_model(model_uri: str, device: str | None = None):
    """Restore a ``.nemo`` (local or ``s3://``) for inference on ``device`` (default: GPU when there is one).

    HablaError, in one line, for a file that is not a ``.nemo`` and for a model class CtcRunner cannot run
    (told from its config, before anything is built).
    """
    local = _model_file(model_uri)
    name = model_class(local, model_uri)
    if name is not None and name not in CTC_MODELS + HYBRID_MODELS + TRANSDUCER_MODELS:
        raise HablaError(f"--model {model_uri}: {_unsupported(name)}")
    import torch
    from nemo.collections.asr.models import ASRModel

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = ASRModel.restore_from(str(local), map_location=torch.device(device))
    except Exception as exc:  # noqa: BLE001 - a .nemo cut short or corrupt fails in many ways inside NeMo and torch
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


def _padded(windows: Sequence[np.ndarray]):
    """The windows as one zero-padded batch (windows x samples) and their lengths, as torch tensors."""
    import torch

    lengths = torch.tensor([len(w) for w in windows], dtype=torch.long)
    batch = torch.zeros(len(windows), int(lengths.max()))
    for i, w in enumerate(windows):
        batch[i, : len(w)] = torch.from_numpy(w)
    return batch, lengths


def _refuse_non_finite(runner, outputs: str) -> None:
    """Refuse a model whose ``outputs`` for a second of quiet noise are not finite: broken weights (a diverged
    training) would turn every transcript into NaN's argmax."""
    probe = np.random.default_rng(0).normal(0.0, 0.01, runner.rate).astype(np.float32)
    if not _finite(runner.log_probs([probe])[0]):
        raise HablaError(
            f"the model produces non-finite {outputs} for a second of quiet noise: its weights are broken (a "
            "diverged training?); it cannot transcribe"
        )


def _finite(tensor) -> bool:
    import torch

    return bool(torch.isfinite(tensor).all())


def _char_word_confidence(text: str, token_confidence: list[float], aggregate) -> list[float] | None:
    """Word confidences of a character model's hypothesis: its tokens are the text's characters, so each word
    takes its own characters' values, whatever spaces surround it (NeMo's own aggregation assumes exactly one
    space between words and none around them). None when the tokens are not the characters."""
    if len(token_confidence) != len(text):
        return None
    words, current = [], []
    for char, value in zip(text, token_confidence):
        if not char.isspace():
            current.append(value)
        elif current:
            words.append(aggregate(current))
            current = []
    return words + [aggregate(current)] if current else words


def default_decoder(model) -> str:
    """The head a model is scored with unless told otherwise: a hybrid's transducer (NeMo's default decoder,
    what NVIDIA's cards report), a transducer's, a CTC model's CTC head."""
    return "ctc" if type(model).__name__ in CTC_MODELS else "rnnt"


def decoders_of(model) -> tuple[str, ...]:
    """The heads a model has."""
    name = type(model).__name__
    return ("ctc",) if name in CTC_MODELS else ("rnnt",) if name in TRANSDUCER_MODELS else DECODERS


def make_runner(model, decoder: str | None = None, timestamps: bool = False, confidence: bool = False):
    """The runner of ``model``'s head ``decoder`` (None: :func:`default_decoder`); one line for a head the
    model lacks."""
    name = type(model).__name__
    decoder = decoder or default_decoder(model)
    if decoder not in DECODERS:
        raise HablaError(f"--decoder {decoder}: choose one of {', '.join(DECODERS)}")
    if decoder not in decoders_of(model):
        raise HablaError(f"--decoder {decoder}: a {name} has no {decoder.upper()} head (it has: "
                         f"{', '.join(decoders_of(model))})")  # fmt: skip
    if decoder == "ctc":
        return CtcRunner(model, timestamps=timestamps, confidence=confidence)
    if timestamps or confidence:
        raise HablaError("--timestamps and --confidence come from a CTC head: with a hybrid model add --decoder ctc")
    return RnntRunner(model)


class CtcRunner:
    """The CTC path of a NeMo model: log-probabilities of audio windows, and NeMo's CTC decoding of them."""

    decoder = "ctc"

    def __init__(self, model, timestamps: bool = False, confidence: bool = False) -> None:
        from nemo.collections.asr import models as asr_models
        from omegaconf import OmegaConf, open_dict

        self.model = model
        if type(model) not in {getattr(asr_models, name) for name in CTC_MODELS + HYBRID_MODELS}:
            raise HablaError(_unsupported(type(model).__name__))  # a subclass too: it may need more (a prompt)
        self.hybrid = type(model).__name__ in HYBRID_MODELS
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
        _refuse_non_finite(self, "outputs (NaN or infinite log-probabilities)")

    @property
    def device(self):
        return next(self.model.parameters()).device

    def log_probs(self, windows: Sequence[np.ndarray]) -> list:
        """Log-probabilities (frames x vocabulary, on the CPU) of each window, computed as one padded batch."""
        import torch

        batch, lengths = _padded(windows)
        self.model.eval()  # NeMo's transcribe() leaves the encoder in training mode (its unfreeze() calls train())
        with torch.inference_mode():
            signal, signal_len = batch.to(self.device), lengths.to(self.device)
            if self.hybrid:
                encoded, encoded_len = self.model.forward(input_signal=signal, input_signal_length=signal_len)
                logits = self.model.ctc_decoder(encoder_output=encoded)
            else:
                logits, encoded_len, _ = self.model.forward(input_signal=signal, input_signal_length=signal_len)
        return [logits[i, : int(encoded_len[i])].float().cpu() for i in range(len(windows))]

    def frame_outputs(self, windows: Sequence[np.ndarray]) -> list:
        """What decoding needs of each window's frames: the label of each frame (the argmax, as NeMo's greedy
        decoding takes it), or with confidence the log-probabilities; None for a window whose log-probabilities
        are not all finite numbers."""
        outputs = self.log_probs(windows)
        return [None if not _finite(lp) else lp if self.confidence else lp.max(dim=-1)[1] for lp in outputs]

    def decode(self, outputs) -> tuple[str, list[dict] | None, list[float] | None]:
        """NeMo's CTC decoding of one recording's frame labels (or log-probabilities): the text (single spaces,
        none around it), word timestamps, word confidences."""
        import torch
        from nemo.collections.asr.parts.utils.timestamp_utils import process_timestamp_outputs

        if outputs.shape[0] == 0:  # shorter than one output frame
            return "", [] if self.timestamps else None, [] if self.confidence else None
        want_hypothesis = self.timestamps or self.confidence
        (hyp,) = self.decoding.ctc_decoder_predictions_tensor(
            outputs[None], decoder_lengths=torch.tensor([outputs.shape[0]]), return_hypotheses=want_hypothesis
        )
        raw = hyp.text if hasattr(hyp, "text") else str(hyp)
        words = confidence = None
        if self.timestamps:
            (hyp,) = process_timestamp_outputs([hyp], self.subsampling, self.window_stride)
            words = [{"word": w["word"], "start": round(float(w["start"]), 3), "end": round(float(w["end"]), 3),
                      "start_offset": int(w["start_offset"]), "end_offset": int(w["end_offset"])}
                     for w in hyp.timestamp.get("word", []) if w["word"].strip()]  # fmt: skip
        if self.confidence:
            values = None
            if self.decoding.tokenizer_type == "char":
                tokens = hyp.token_confidence or []
                values = _char_word_confidence(raw, tokens, self.decoding._aggregate_confidence)
                if values is None:
                    values = self.decoding._aggregate_token_confidence_chars(raw.split(), tokens)
            else:
                values = self.decoding._aggregate_token_confidence(hyp)
            confidence = [round(float(c), 4) for c in values]
        return " ".join(raw.split()), words, confidence


class RnntRunner:
    """The transducer head of a NeMo model (a transducer, or a hybrid's RNNT head): the encoder's frames of
    audio windows, and NeMo's greedy RNNT decoding of a recording's frames laid end to end."""

    decoder = "rnnt"

    def __init__(self, model) -> None:
        from nemo.collections.asr import models as asr_models
        from omegaconf import OmegaConf, open_dict

        self.model = model
        if type(model) not in {getattr(asr_models, name) for name in TRANSDUCER_MODELS + HYBRID_MODELS}:
            raise HablaError(_unsupported(type(model).__name__))
        decoding = OmegaConf.create(OmegaConf.to_container(model.cfg.decoding, resolve=True))
        with open_dict(decoding):
            decoding.strategy = "greedy_batch"
        if type(model).__name__ in HYBRID_MODELS:
            model.change_decoding_strategy(decoding_cfg=decoding, decoder_type="rnnt", verbose=False)
        else:
            model.change_decoding_strategy(decoding, verbose=False)
        self.decoding = model.decoding
        self.timestamps = self.confidence = False
        featurizer = getattr(model.preprocessor, "featurizer", None)
        if featurizer is not None:  # as NeMo's transcribe(): no dither, no padding to 16 frames
            featurizer.dither = 0.0
            featurizer.pad_to = 0
        self.rate = int(model.cfg.sample_rate)
        self.window_stride = float(model.cfg.preprocessor.window_stride)
        self.subsampling = int(getattr(model.encoder, "subsampling_factor", 1))
        self.frame_samples = round(self.window_stride * self.rate) * self.subsampling
        _refuse_non_finite(self, "outputs")

    @property
    def device(self):
        return next(self.model.parameters()).device

    def log_probs(self, windows: Sequence[np.ndarray]) -> list:
        """The encoder's output frames (frames x features, on the CPU) of each window, as one padded batch."""
        import torch

        batch, lengths = _padded(windows)
        self.model.eval()
        with torch.inference_mode():
            encoded, encoded_len = self.model.forward(input_signal=batch.to(self.device),
                                                      input_signal_length=lengths.to(self.device))  # fmt: skip
        return [encoded[i, :, : int(encoded_len[i])].transpose(0, 1).float().cpu() for i in range(len(windows))]

    def frame_outputs(self, windows: Sequence[np.ndarray]) -> list:
        return [None if not _finite(e) else e for e in self.log_probs(windows)]

    def decode(self, outputs) -> tuple[str, None, None]:
        import torch

        if outputs.shape[0] == 0:
            return "", None, None
        with torch.inference_mode():
            encoded = outputs.transpose(0, 1)[None].to(self.device)
            (hyp,) = self.decoding.rnnt_decoder_predictions_tensor(
                encoder_output=encoded, encoded_lengths=torch.tensor([outputs.shape[0]], device=self.device)
            )
        raw = hyp.text if hasattr(hyp, "text") else str(hyp)
        return " ".join(raw.split()), None, None


# ------------------------------------------------------------------------------------------------ windows


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


# --------------------------------------------------------------------------------------------- transcribe


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
