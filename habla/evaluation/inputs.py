"""Recordings to transcribe, from what a user names: audio files, folders, glob patterns and NeMo manifests.

INPUT: audio files, folders (searched recursively for the audio formats libsndfile reads), glob patterns
(``clips/*.mp3``) and NeMo manifests (``.json``/``.jsonl``, one ``{"audio_filepath": …}`` per line; a relative
path is relative to the manifest), local or ``s3://``. A name that exists is taken literally, glob characters
and all (``interview [part 1].wav``); only a name that does not exist is expanded as a pattern. Each file named
is one recording as often as it is named: a repeated manifest line or argument is transcribed again.

Inputs are untrusted. A FIFO, a device (a symlink to ``/dev/zero``), a folder or a socket named as a recording
is rejected (``not_a_file``) without being read, so is a missing, unreadable or undecodable one, and the run goes
on. Audio is decoded in-process by libsndfile, down-mixed and resampled to the model's rate by soxr, as a stream
(habla.speech.audio.stream), never by a subprocess.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from habla.core import jsonl, storage, untrusted
from habla.core.errors import Fault, HablaError, one_line
from habla.speech import audio, manifests

MANIFEST_SUFFIXES = (".json", ".jsonl")
_GLOB_CHARS = "*?["
#: The largest manifest read: a manifest of a million recordings is about 300 MB.
MAX_MANIFEST_BYTES = 1 << 30


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
