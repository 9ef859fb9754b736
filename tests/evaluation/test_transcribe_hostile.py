"""habla transcribe under hostile input: what it promises, pinned on the reported cases and on generated ones.

* A FIFO, a device (a symlink to /dev/zero), a folder, a socket or a symlink loop named as a recording or a
  manifest (directly, in a folder, by a glob, on a manifest line) is rejected as ``not_a_file``, never read:
  no hang (every call here runs under :func:`no_hang`), no unbounded read.
* A name that exists is taken literally, glob characters and all; only a name that does not exist is a pattern.
* Every input is accounted for once: a repeated argument or manifest line is transcribed again, in input
  order; a missing, unreadable or undecodable input is rejected with its reason and the run goes on; when
  nothing is transcribed, exit 2 in one line that points at rejected.jsonl.
* Recordings are decoded and resampled as a stream: the samples are those of decoding the whole file, the
  transcripts those of windowing the whole recording (the slow test), and memory does not grow with length.
* A .nemo that is corrupt, truncated, not a .nemo, or of a class habla cannot run is one line and exit 2; so
  is a model whose outputs are not finite (nothing is written); ``pred_text`` has single spaces only.
* The property test (hypothesis) generates input sets of all of these and checks, for each: exit 0 or 2, at
  most one line on stderr and no traceback, no hang, every input in exactly one of transcripts.json and
  rejected.jsonl, in input order, with a documented reason. CI runs the ``ci`` profile (fixed examples,
  derandomized); the long one: ``HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -m hostile_long
  tests/evaluation/test_transcribe_hostile.py``.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fixtures.commands import read_jsonl
from fixtures.releases import MINI, ROOT
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from habla import cli
from habla.core.errors import HablaError
from habla.evaluation import transcribe as tr
from habla.evaluation.inputs import AudioInput, collect_inputs, read_audio
from habla.evaluation.runners import CtcRunner, load_model
from habla.evaluation.windows import CONTEXT_S, WINDOW_S, plan_windows
from habla.speech import audio

PROFILES = {
    "ci": {"max_examples": 30, "deadline": timedelta(seconds=60), "derandomize": True},
    "long": {"max_examples": 300, "deadline": None},
}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

# Every reason docs/layout.md lists for rejected.jsonl of habla transcribe.
_TRANSCRIBE_DOC = (ROOT / "docs" / "layout.md").read_text().split("## `transcripts/transcripts.json`")[1]
DOCUMENTED_REASONS = set(re.findall(r"^\| `([a-z_]+)` \|", _TRANSCRIBE_DOC.split("\n## ")[0], re.M))


# ------------------------------------------------------------------------------------------------ helpers


class Hang(BaseException):
    """Raised by :func:`no_hang`: a BaseException, so that no ``except Exception`` of the code under test can
    take it for a rejected input."""


@contextlib.contextmanager
def no_hang(seconds: float):
    """Fail, rather than hang, a call that blocks (a FIFO opened for reading) or never ends (/dev/zero): after
    ``seconds`` a signal interrupts the main thread, whatever system call it waits in."""

    def interrupted(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGUSR1, interrupted)
    timer = threading.Timer(seconds, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, previous)


class StandInRunner:
    """A CtcRunner stand-in without a model: one label per output frame; the text says how many frames."""

    rate, frame_samples = 16000, 320

    def frame_outputs(self, windows):
        import torch

        return [torch.zeros(-(-len(w) // self.frame_samples), dtype=torch.long) for w in windows]

    def decode(self, frames):
        return f"{len(frames)} frames", None, None


def transcribed(inputs, batch_size: int = 4) -> tuple[list[str], list[dict]]:
    """``audio_filepath`` of each transcript, and the rejected lines, of ``inputs`` (StandInRunner)."""
    rejected: list[dict] = []
    with no_hang(30):
        found = collect_inputs([str(i) for i in inputs])
        done = [item.uri for item, _ in tr.transcribe_inputs(StandInRunner(), found, batch_size, rejected=rejected)]
    return done, rejected


def run_cli(*args: str, timeout: float = 120) -> tuple[int, str]:
    """``habla transcribe ARGS`` through the CLI's main(), in this process (NeMo is imported once): its exit
    code and what it wrote on stderr (an exception escaping main() is a traceback: the test fails)."""
    err = io.StringIO()
    if not logging.getLogger().handlers:  # else main() would bind its log handler to this run's stderr
        logging.getLogger().addHandler(logging.NullHandler())
    with no_hang(timeout), contextlib.redirect_stderr(err):
        try:
            code = cli.main(["transcribe", *args])
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, err.getvalue()


def one_error_line(err: str, *words: str) -> str:
    """The one line a failed command writes, checked: no traceback, ``habla transcribe: error:``, ``words``."""
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("habla transcribe: error: ") and all(w in err for w in words), err
    return err


def encoded(samples, rate: int, fmt: str = "WAV", subtype: str | None = "PCM_16") -> bytes:
    out = io.BytesIO()
    sf.write(out, np.asarray(samples, dtype=np.float32), rate, format=fmt, subtype=subtype)
    return out.getvalue()


def clips_by_format() -> list[Path]:
    """One real clip of 1-3 s per (sample rate, channels) of the bundled release (48/44.1/32 kHz, mono/stereo)."""
    durations = dict(line.split("\t") for line in (MINI / "clip_durations.tsv").read_text().splitlines()[1:])
    chosen: dict[tuple[int, int], Path] = {}
    for name in sorted(durations):
        if 1000 <= int(durations[name]) <= 3000:
            info = sf.info(MINI / "clips" / name)
            chosen.setdefault((info.samplerate, info.channels), MINI / "clips" / name)
    return list(chosen.values())


REAL = clips_by_format()
SPEECH, SPEECH_RATE = sf.read(REAL[0], dtype="float32")
NOISE = np.random.default_rng(0).normal(0, 0.1, 8000).astype(np.float32)
NAN = NOISE.copy()
NAN[100] = np.nan
#: Audio of odd shapes that decodes: rates from 8 to 96 kHz, stereo, float samples, other containers.
ODD_AUDIO = {
    "wav_22050": encoded(SPEECH[::2], 22050),
    "wav_8000": encoded(NOISE, 8000),
    "flac_11025_stereo": encoded(np.stack([NOISE, NOISE * 0.5], axis=1), 11025, "FLAC"),
    "ogg_24000": encoded(NOISE, 24000, "OGG", "VORBIS"),
    "wav_float_96000": encoded(NOISE, 96000, "WAV", "FLOAT"),
    "wav_4ch_44100": encoded(np.stack([NOISE] * 4, axis=1), 44100, "WAV", "PCM_24"),
    "mp3_22050": encoded(SPEECH[::2], 22050, "MP3", None),  # MPEG-2
    "mp3_8000_stereo": encoded(np.stack([NOISE, NOISE * 0.5], axis=1), 8000, "MP3", None),  # MPEG-2.5
}
NAN_WAV = encoded(NAN, 16000, "WAV", "FLOAT")
HUGE_WAV = encoded(NOISE * 1e20, 16000, "WAV", "FLOAT")  # finite samples the model's features overflow on
RATE_4K = encoded(NOISE, 4000)


def make_fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def make_link(path: Path, target) -> Path:
    os.symlink(target, path)
    return path


# ------------------------------------------------------------------------------------- non-files, globs


def test_a_fifo_a_device_a_folder_or_a_loop_is_rejected_never_read(tmp_path):
    """Named directly, found in a folder, matched by a glob or named on a manifest line: rejected, no hang."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ok.wav").write_bytes(encoded(NOISE, 16000))
    odd = {
        "fifo.wav": make_fifo(folder / "fifo.wav"),
        "zero.wav": make_link(folder / "zero.wav", "/dev/zero"),
        "loop.wav": make_link(folder / "loop.wav", folder / "loop.wav"),
        "gone.wav": make_link(folder / "gone.wav", folder / "nowhere.wav"),
    }
    (folder / "dir.wav").mkdir()
    with contextlib.closing(socket.socket(socket.AF_UNIX)) as server:
        try:
            server.bind(str(folder / "sock.wav"))
            odd["sock.wav"] = folder / "sock.wav"
        except OSError:  # a path over the 108-byte limit of a socket's name
            pass
        reason = {name: "missing_file" if name == "gone.wav" else "not_a_file" for name in odd}
        manifest = tmp_path / "list.json"
        manifest.write_text("".join(json.dumps({"audio_filepath": f"in/{n}"}) + "\n" for n in [*odd, "dir.wav"]))
        routes = {  # inputs, how many times ok.wav is transcribed, the reasons
            "directly": ([*odd.values(), folder / "dir.wav"], 1, {**reason, "dir.wav": "empty_folder"}),
            "in a folder": ([folder], 2, reason),  # the folder it holds is walked into, not a recording
            "by a glob": ([folder / "*.wav"], 2, {**reason, "dir.wav": "not_a_file"}),
            "on manifest lines": ([manifest], 1, {**reason, "dir.wav": "not_a_file"}),
        }
        for route, (inputs, times, reasons) in routes.items():
            done, rejected = transcribed([*inputs, folder / "ok.wav"])
            assert done == [str(folder / "ok.wav")] * times, route
            assert {Path(r["audio_filepath"]).name: r["reason"] for r in rejected} == reasons, route
        fifo_manifest = make_fifo(tmp_path / "fifo.json")
        zero_manifest = make_link(tmp_path / "zero.jsonl", "/dev/zero")
        _, rejected = transcribed([fifo_manifest, zero_manifest])
        assert [(r["audio_filepath"], r["reason"]) for r in rejected] == [
            (str(fifo_manifest), "not_a_file"),
            (str(zero_manifest), "not_a_file"),
        ]


def test_a_name_that_exists_is_taken_literally_even_with_glob_characters(tmp_path):
    names = ["interview [part 1].wav", "interview p.wav", "*.wav", "?.wav", "a.wav", "[a].wav"]
    for name in names:
        (tmp_path / name).write_bytes(encoded(NOISE, 16000))
    for name in ["interview [part 1].wav", "*.wav", "?.wav", "[a].wav"]:
        assert transcribed([tmp_path / name]) == ([str(tmp_path / name)], [])
    # names that do not exist are patterns
    assert transcribed([tmp_path / "[ab].wav"])[0] == [str(tmp_path / "a.wav")]
    assert transcribed([tmp_path / "interview [p].wav"])[0] == [str(tmp_path / "interview p.wav")]
    assert transcribed([tmp_path / "*view*"])[0] == [str(tmp_path / "interview [part 1].wav"),
                                                     str(tmp_path / "interview p.wav")]  # fmt: skip
    (nothing,) = transcribed([tmp_path / "nomatch*.flac"])[1]
    assert nothing == {"audio_filepath": str(tmp_path / "nomatch*.flac"), "reason": "missing_file",
                       "detail": "no such file, and no audio file matches it as a pattern"}  # fmt: skip


# ------------------------------------------------------------------------------------------- accounting


def test_every_input_is_accounted_for_once_in_input_order(tmp_path):
    """Repeated arguments and manifest lines are transcribed again; what cannot be is rejected, and the rest
    goes on."""
    a, b = tmp_path / "a.wav", tmp_path / "sub" / "b.flac"
    b.parent.mkdir()
    a.write_bytes(encoded(NOISE, 16000))
    b.write_bytes(encoded(NOISE, 44100, "FLAC"))
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_bytes(b"not audio at all")
    lines = [{"audio_filepath": "a.wav", "id": 1}, {"audio_filepath": str(a), "id": 2}, "{not json",
             {"audio_filepath": "sub/b.flac", "id": 4}, {"text": "no path"}, {"audio_filepath": "gone.wav"},
             {"audio_filepath": "a.wav", "id": 7}, [1, 2], {"audio_filepath": ""}]  # fmt: skip
    manifest = tmp_path / "list.jsonl"
    manifest.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
    inputs = [a, a, tmp_path / "missing.wav", manifest, tmp_path / "empty.wav", b, tmp_path / "text.wav", a]
    rejected: list[dict] = []
    with no_hang(30):
        found = collect_inputs([str(i) for i in inputs])
        done = list(tr.transcribe_inputs(StandInRunner(), found, batch_size=3, rejected=rejected))
    assert [(item.uri, item.fields.get("id")) for item, _ in done] == [
        (str(a), None), (str(a), None), (str(a), 1), (str(a), 2), (str(b), 4), (str(a), 7), (str(b), None),
        (str(a), None)]  # fmt: skip
    assert [(r["audio_filepath"], r.get("line"), r["reason"]) for r in rejected] == [
        (str(tmp_path / "missing.wav"), None, "missing_file"), (None, 3, "bad_manifest_line"),
        (None, 5, "bad_manifest_line"), (str(tmp_path / "gone.wav"), 6, "missing_file"),
        (None, 8, "bad_manifest_line"), (None, 9, "bad_manifest_line"), (str(tmp_path / "empty.wav"), None,
        "empty_file"), (str(tmp_path / "text.wav"), None, "decode_error")]  # fmt: skip
    assert all(r["manifest"] == str(manifest) for r in rejected if "line" in r)


def test_a_recording_that_breaks_part_way_is_rejected_and_the_others_go_on(tmp_path):
    """A long recording whose samples turn to NaN after 70 s, between two sound ones: its windows already
    computed (batched with the others') are dropped, the others' transcripts are whole and in order."""
    samples = np.tile(NOISE, 90 * 2)
    samples[70 * 16000] = np.nan
    sf.write(tmp_path / "breaks.wav", samples, 16000, subtype="FLOAT")
    sf.write(tmp_path / "long.wav", np.tile(NOISE, 60), 16000)
    (tmp_path / "short.wav").write_bytes(encoded(NOISE, 16000))
    rejected: list[dict] = []
    with no_hang(60):
        inputs = [AudioInput(str(tmp_path / n)) for n in ("long.wav", "breaks.wav", "short.wav")]
        done = list(tr.transcribe_inputs(StandInRunner(), inputs, batch_size=2, window_s=5, rejected=rejected))
    assert [(Path(i.uri).name, t.duration, t.text) for i, t in done] == [("long.wav", 30.0, "1500 frames"),
                                                                         ("short.wav", 0.5, "25 frames")]  # fmt: skip
    assert rejected == [{"audio_filepath": str(tmp_path / "breaks.wav"), "reason": "decode_error",
                         "detail": "samples that are not finite numbers"}]  # fmt: skip


# -------------------------------------------------------------------------------------------- streaming


def test_streamed_samples_are_those_of_decoding_the_whole_file(tmp_path):
    """audio.stream, block by block, gives the very samples of decoding the whole file and resampling it at
    once (as habla transcribe did, and habla prepare does): same transcripts."""
    longest = max((MINI / "clips").glob("*.mp3"), key=lambda p: sf.info(p).frames)  # more than one block
    files = {p.name: p.read_bytes() for p in [*REAL, longest]} | ODD_AUDIO
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        whole = audio.to_target(*audio.decode(data))
        assert np.array_equal(read_audio(str(tmp_path / name), 16000), whole), name
        with open(tmp_path / name, "rb") as f:
            assert np.array_equal(np.concatenate(list(audio.stream(f, 16000, block_frames=777))), whole), name
    import soxr

    samples, rate = audio.decode(ODD_AUDIO["flac_11025_stereo"])
    at_8k = soxr.resample(audio.downmix(samples), rate, 8000, quality="HQ")
    assert np.array_equal(read_audio(str(tmp_path / "flac_11025_stereo"), 8000), at_8k)  # another model rate


_PEAK_SCRIPT = """
import sys
import numpy as np, torch
from habla.evaluation import transcribe as tr
from habla.evaluation.inputs import AudioInput

class Runner:
    rate, frame_samples = 16000, 320
    def frame_outputs(self, windows):
        return [torch.zeros(-(-len(w) // 320), dtype=torch.long) for w in windows]
    def decode(self, frames):
        return "", None, None

def peak_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024

before = peak_mib()
((_, t),) = tr.transcribe_inputs(Runner(), [AudioInput(sys.argv[1])], batch_size=8)
print(t.duration, peak_mib() - before)
"""


def test_memory_does_not_grow_with_the_recording(tmp_path):
    """A 10-minute 48 kHz stereo recording costs no more memory than a 3-minute one (both fill a batch of 8
    windows); read whole, it would cost about 300 MB more (45 MB a minute)."""
    tone = np.sin(np.arange(48000 * 10) * (2 * np.pi * 220 / 48000)).astype(np.float32) * 0.3
    block = np.stack([tone, tone * 0.5], axis=1)
    growth = {}
    for minutes in (3, 10):
        path = tmp_path / f"{minutes}.flac"
        with sf.SoundFile(path, "w", 48000, 2, format="FLAC") as f:
            for _ in range(minutes * 6):
                f.write(block)
        result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True,
                                timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)  # fmt: skip
        duration, growth[minutes] = map(float, result.stdout.split())
        assert duration == minutes * 60
    assert growth[10] - growth[3] < 8, growth


# ---------------------------------------------------------------------------------------------- models


def _nemo(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _config(target: str | None) -> bytes:
    return json.dumps({"sample_rate": 16000, **({"target": target} if target else {})}).encode()  # YAML too


def _bad_models(where: Path) -> dict[str, tuple[Path, str]]:
    """Files given as --model that are not a model habla can run, and a word of the error each must give."""
    where.mkdir()
    (where / "random.nemo").write_bytes(os.urandom(5000))
    (where / "empty.nemo").write_bytes(b"")
    (where / "text.nemo").write_text("not a model\n")
    (where / "audio.nemo").write_bytes(encoded(NOISE, 16000))
    (where / "folder.nemo").mkdir()
    return {
        "random bytes": (where / "random.nemo", "not a .nemo file"),
        "empty": (where / "empty.nemo", "not a .nemo file"),
        "text": (where / "text.nemo", "not a .nemo file"),
        "a WAV": (where / "audio.nemo", "not a .nemo file"),
        "a folder": (where / "folder.nemo", "not a .nemo file but a folder"),
        "a FIFO": (make_fifo(where / "fifo.nemo"), "not a .nemo file but a FIFO"),
        "/dev/zero": (make_link(where / "zero.nemo", "/dev/zero"), "not a .nemo file but a character device"),
        "missing": (where / "missing.nemo", "no such file"),
        "a tar without config": (_nemo(where / "noconfig.nemo", {"weights.ckpt": b"x"}), "no model_config.yaml"),
        "a multitask model": (_nemo(where / "canary.nemo", {"model_config.yaml": _config(
            "nemo.collections.asr.models.EncDecMultiTaskModel")}), "EncDecMultiTaskModel: habla transcribes"),
        "a classifier": (_nemo(where / "cls.nemo", {"model_config.yaml": _config(
            "nemo.collections.asr.models.classification_models.EncDecClassificationModel")}), "CTC models"),
        "a hybrid subclass": (_nemo(where / "prompt.nemo", {"model_config.yaml": _config(
            "nemo.collections.asr.models.EncDecHybridRNNTCTCBPEModelWithPrompt")}), "transducers"),
        "a config that is not a mapping": (_nemo(where / "list.nemo", {"model_config.yaml": b"- 1\n"}), "mapping"),
        "a config that is not YAML": (_nemo(where / "yaml.nemo", {"model_config.yaml": b"a: [\n"}), "not a .nemo"),
    }  # fmt: skip


def test_a_file_that_is_not_a_model_habla_can_run_is_one_line_and_exit_2(tmp_path):
    clip = tmp_path / "clip.wav"
    clip.write_bytes(encoded(NOISE, 16000))
    for case, (model, words) in _bad_models(tmp_path / "models").items():
        code, err = run_cli("--model", str(model), "--out", str(tmp_path / "out"), str(clip), timeout=60)
        assert code == 2, case
        one_error_line(err, f"--model {model}: ", words)
        assert not (tmp_path / "out" / "transcripts.json").exists(), case


@pytest.mark.slow
def test_a_corrupt_or_truncated_model_is_one_line_and_exit_2(tiny_model, tmp_path):
    from nemo.collections.asr.models import EncDecCTCModel

    clip = tmp_path / "clip.wav"
    clip.write_bytes(encoded(SPEECH, SPEECH_RATE))
    data = tiny_model.read_bytes()
    with tarfile.open(tiny_model) as tar:
        config = tar.extractfile("./model_config.yaml").read()
    cases = {
        "cut in its config": (data[:1500], "not a .nemo file"),
        "cut in its weights": (data[: len(data) // 2], "cannot restore a NeMo model"),
        "garbage weights": (None, "cannot restore a NeMo model"),
        "no target, weights": (None, "cannot restore a NeMo model"),
    }
    for case, (content, words) in cases.items():
        model = tmp_path / f"{case}.nemo"
        if case == "garbage weights":
            _nemo(model, {"model_config.yaml": config, "model_weights.ckpt": os.urandom(20000)})
        elif case == "no target, weights":
            _nemo(model, {"model_config.yaml": re.sub(rb"\ntarget: .*\n", b"\n", config)})
        else:
            model.write_bytes(content)
        code, err = run_cli("--model", str(model), "--out", str(tmp_path / "out"), str(clip), timeout=120)
        assert code == 2, case
        one_error_line(err, f"--model {model}", words)

    class Prompted(EncDecCTCModel):  # a subclass may need more than audio: not run
        pass

    with pytest.raises(HablaError, match="Prompted: habla transcribes with CTC models"):
        CtcRunner(object.__new__(Prompted))


@pytest.mark.slow
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_model_whose_outputs_are_not_finite_is_refused(tiny_model, tmp_path, value, one_thread):
    import torch
    from nemo.collections.asr.models import ASRModel

    model = ASRModel.restore_from(str(tiny_model), map_location="cpu")
    with torch.no_grad():
        next(model.decoder.parameters()).fill_(value)
    model.save_to(str(tmp_path / "broken.nemo"))
    clip = tmp_path / "clip.wav"
    clip.write_bytes(encoded(SPEECH, SPEECH_RATE))
    code, err = run_cli("--model", str(tmp_path / "broken.nemo"), "--out", str(tmp_path / "out"), str(clip))
    assert code == 2
    one_error_line(err, "the model produces non-finite outputs (NaN or infinite log-probabilities)")
    assert not (tmp_path / "out" / "transcripts.json").exists()  # nothing written


@pytest.mark.slow
def test_recordings_the_model_cannot_score_are_rejected_and_nothing_at_all_is_exit_2(tiny_model, tmp_path, one_thread):
    """Samples far outside ±1 (finite) overflow the model's features: that recording is rejected, the others
    are transcribed; when no input at all is, exit 2 with one line that points at rejected.jsonl."""
    (tmp_path / "huge.wav").write_bytes(HUGE_WAV)
    (tmp_path / "speech.wav").write_bytes(encoded(SPEECH, SPEECH_RATE))
    out = tmp_path / "out"
    code, err = run_cli("--model", str(tiny_model), "--out", str(out), str(tmp_path / "huge.wav"),
                        str(tmp_path / "speech.wav"))  # fmt: skip
    assert code == 0 and err == ""
    assert [line["audio_filepath"] for line in read_jsonl(out / "transcripts.json")] == [str(tmp_path / "speech.wav")]
    assert [r["reason"] for r in read_jsonl(out / "rejected.jsonl")] == ["non_finite_output"]

    code, err = run_cli("--model", str(tiny_model), "--out", str(out), str(tmp_path / "huge.wav"),
                        str(tmp_path / "nope.wav"))  # fmt: skip
    assert code == 2
    one_error_line(err, "no input could be transcribed (2 rejected", str(out / "rejected.jsonl"))
    assert [r["reason"] for r in read_jsonl(out / "rejected.jsonl")] == ["non_finite_output", "missing_file"]
    assert read_jsonl(out / "transcripts.json") == []


@pytest.mark.slow
def test_pred_text_has_single_spaces_and_each_word_its_own_confidence(tiny_model, one_thread):
    """A hypothesis " hola  que " (spaces around and doubled, as a character model can output) is written
    "hola que", with one timestamp and one confidence per word, each from the word's own characters."""
    import torch

    model = load_model(str(tiny_model), "cpu")
    vocabulary = list(model.decoder.vocabulary)
    blank = len(vocabulary)
    probability = {" ": 0.3, "h": 0.9, "o": 0.8, "l": 0.9, "a": 0.7, "q": 0.6, "u": 0.9, "e": 0.9}

    def frames(text: str) -> tuple:
        """Labels and log-probabilities of ``text``: a frame per character (of its probability), then a blank."""
        labels, log_probs = [], []
        for char in text:
            for label, p in ((vocabulary.index(char), probability[char]), (blank, 0.99)):
                row = torch.full((blank + 1,), float(np.log((1 - p) / blank)))
                row[label] = float(np.log(p))
                labels.append(label)
                log_probs.append(row)
        return torch.tensor(labels), torch.stack(log_probs)

    runner = CtcRunner(model, timestamps=True)
    text, words, _ = runner.decode(frames(" hola  que ")[0])
    assert text == "hola que" and [w["word"] for w in words] == ["hola", "que"]
    runner = CtcRunner(model, timestamps=True, confidence=True)
    text, words, values = runner.decode(frames(" hola  que ")[1])
    assert text == "hola que" and [w["word"] for w in words] == ["hola", "que"]
    assert values == runner.decode(frames("hola que")[1])[2]  # NeMo's values where its rule holds
    assert values[0] > values[1]  # each word's own characters: not the leading space's 0.3


@pytest.mark.slow
def test_a_long_streamed_recording_gets_the_transcript_of_the_whole_recording(tiny_model, train_clips, tmp_path,
                                                                               one_thread):  # fmt: skip
    """A 3-minute 48 kHz stereo recording, streamed and windowed as it is read, gets the transcript (and word
    timestamps) of decoding the whole file, resampling it at once and cutting the windows from it."""
    import soxr
    import torch

    clips = [sf.read(e["audio_filepath"], dtype="float32")[0] for e in train_clips[:40]]
    pause = np.zeros(8000, dtype=np.float32)
    speech = np.concatenate([x for clip in clips * 6 for x in (clip, pause)])[: 180 * 16000]
    at_48k = soxr.resample(speech, 16000, 48000, quality="HQ")
    sf.write(tmp_path / "long.flac", np.stack([at_48k, at_48k * 0.8], axis=1), 48000, subtype="PCM_24")

    tr.transcribe(str(tiny_model), [str(tmp_path / "long.flac")], str(tmp_path / "out"), timestamps=True)
    (line,) = read_jsonl(tmp_path / "out" / "transcripts.json")

    runner = CtcRunner(load_model(str(tiny_model), "cpu"), timestamps=True)
    whole = audio.to_target(*audio.decode((tmp_path / "long.flac").read_bytes()))
    plans = plan_windows(len(whole), runner.frame_samples, WINDOW_S, CONTEXT_S, runner.rate)
    outputs = runner.log_probs([whole[start:end] for start, end, _, _ in plans])  # one batch, as transcribe's
    pieces = [lp[skip:] if keep is None else lp[skip : skip + keep] for lp, (_, _, skip, keep) in zip(outputs, plans)]
    text, words, _ = runner.decode(torch.cat(pieces))
    assert len(plans) == 9 and line["duration"] == 180.0 and text
    assert (line["pred_text"], line["word"]) == (text, words)


# ---------------------------------------------------------------------------------- generated inputs

KINDS = ("speech", "odd", "nan", "huge", "rate_4k", "empty", "random", "truncated", "fifo", "zero_link",
         "dangling", "loop", "folder")  # fmt: skip
#: What each kind of file may end as, by the route it is named through ("ok": transcribed).
OUTCOMES = {
    "speech": {"ok"}, "odd": {"ok"}, "nan": {"decode_error"}, "huge": {"non_finite_output"},
    "rate_4k": {"unsupported_audio"}, "empty": {"empty_file"},
    "random": {"ok", "decode_error", "no_audio", "unsupported_audio", "empty_file"},
    "truncated": {"ok", "decode_error", "no_audio", "empty_file"}, "fifo": {"not_a_file"},
    "zero_link": {"not_a_file"}, "dangling": {"missing_file"}, "loop": {"not_a_file"}, "folder": {"not_a_file"},
}  # fmt: skip
STEM_CHARS = list("ab -_[]*?!ñé日'#{}") + ["interview [part 1]", "--x"]
EXTENSIONS = [".wav", ".mp3", ".flac", ".WAV", ".ogg"]


@st.composite
def files(draw) -> dict[str, tuple]:
    """Names (glob characters, spaces, unicode, leading dashes) and what each is on disk: (kind, parameter)."""
    stem = st.lists(st.sampled_from(STEM_CHARS), min_size=1, max_size=4).map("".join)
    stems = draw(st.lists(stem, min_size=1, max_size=6))
    found = {}
    for stem in stems:
        name = stem + draw(st.sampled_from(EXTENSIONS))
        kind = draw(st.sampled_from(["speech", "speech", "odd", *KINDS]))
        if kind == "speech":
            found[name] = (kind, draw(st.sampled_from(range(len(REAL)))))
        elif kind == "odd":
            found[name] = (kind, draw(st.sampled_from(sorted(ODD_AUDIO))))
        elif kind == "random":
            found[name] = (kind, draw(st.binary(max_size=2000)))
        elif kind == "truncated":
            found[name] = (kind, (draw(st.sampled_from(["wav", "mp3"])), draw(st.floats(0.0, 0.95))))
        else:
            found[name] = (kind, None)
    return found


def materialize(folder: Path, spec: dict[str, tuple]) -> None:
    folder.mkdir(parents=True)
    for name, (kind, param) in spec.items():
        path = folder / name
        if kind == "speech":
            path.write_bytes(REAL[param].read_bytes())
        elif kind == "odd":
            path.write_bytes(ODD_AUDIO[param])
        elif kind in ("nan", "huge", "rate_4k", "empty", "random"):
            path.write_bytes({"nan": NAN_WAV, "huge": HUGE_WAV, "rate_4k": RATE_4K, "empty": b""}.get(kind, param))
        elif kind == "truncated":
            data = REAL[0].read_bytes() if param[0] == "mp3" else encoded(SPEECH, SPEECH_RATE)
            path.write_bytes(data[: int(len(data) * param[1])])
        elif kind == "fifo":
            make_fifo(path)
        elif kind == "zero_link":
            make_link(path, "/dev/zero")
        elif kind == "dangling":
            make_link(path, folder / "nowhere")
        elif kind == "loop":
            make_link(path, path)
        elif kind == "folder":
            path.mkdir()


line_kinds = st.one_of(
    st.tuples(st.sampled_from(["abs", "rel", "missing"]), st.integers(0, 9)),
    st.tuples(
        st.just("junk"),
        st.sampled_from(
            [
                "{not json",
                "[1, 2]",
                '"a string"',
                "NaN",
                "{}",
                '{"audio_filepath": 3}',
                '{"audio_filepath": " "}',
                "[" * 5000,
            ]
        ),
    ),  # fmt: skip
    st.tuples(st.just("blank"), st.just(0)),
)
arguments = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["file", "missing"]), st.integers(0, 9)),
        st.tuples(st.just("folder"), st.just(0)),
        st.tuples(st.just("glob"), st.sampled_from(["*", "*.wav", "*.mp3", "*[!v]", "nomatch*.flac", "?*.WAV"])),
        st.tuples(st.just("manifest"), st.lists(line_kinds, max_size=6)),
        st.tuples(st.just("manifest_fifo"), st.just(0)),
    ),
    min_size=1,
    max_size=5,
)
options = st.fixed_dictionaries(
    {
        "timestamps": st.booleans(),
        "confidence": st.booleans(),
        "batch": st.sampled_from(["1", "3", "8"]),
        "window": st.sampled_from([None, ("1", "0.5"), ("0.7", "0")]),
    }  # fmt: skip
)


class Expected:
    """What a run must write, from the generated names alone: each input in order as (key, allowed outcomes);
    a key is ``(audio_filepath, "manifest:line" or None)``."""

    def __init__(self, folder: Path, spec: dict[str, tuple]) -> None:
        self.folder, self.spec, self.entries = folder, spec, []

    def add(self, path: str, origin: str | None, allowed: set[str]) -> None:
        self.entries.append(((path, origin), allowed))

    def file(self, name: str, origin: str | None = None) -> None:
        kind = self.spec[name][0] if name in self.spec else "dangling"
        self.add(str(self.folder / name), origin, OUTCOMES[kind])

    def argument(self, path: Path, name: str) -> None:
        if self.spec.get(name, ("",))[0] == "folder":  # a folder given as an input: its audio files, none here
            self.add(str(path), None, {"empty_folder"})
        else:
            self.file(name)

    def folder_walk(self) -> None:
        names = sorted(n for n, (kind, _) in self.spec.items() if kind != "folder")
        for name in names:
            self.file(name)
        if not names:
            self.add(str(self.folder), None, {"empty_folder"})

    def pattern(self, pattern: str) -> None:
        path = str(self.folder / pattern)
        if os.path.lexists(path):
            return self.argument(Path(path), pattern)
        matches = [m for m in sorted(glob.glob(path)) if Path(m).suffix.lower() in {".wav", ".mp3", ".flac", ".ogg"}]
        for match in matches:
            self.file(Path(match).name)
        if not matches:
            self.add(path, None, {"missing_file"})


def write_arguments(where: Path, spec: dict[str, tuple], chosen: list[tuple]) -> tuple[list[str], Expected]:
    """The command line's inputs, with the manifests they name written, and what the run must write."""
    folder, names = where / "in", sorted(spec)
    expected = Expected(folder, spec)
    args = []
    for k, (what, param) in enumerate(chosen):
        if what == "file":
            name = names[param % len(names)]
            args.append(str(folder / name))
            expected.argument(folder / name, name)
        elif what == "missing":
            args.append(str(folder / f"missing {param}.wav"))
            expected.add(args[-1], None, {"missing_file"})
        elif what == "folder":
            args.append(str(folder))
            expected.folder_walk()
        elif what == "glob":
            args.append(str(folder / param))
            expected.pattern(param)
        elif what == "manifest_fifo":
            args.append(str(make_fifo(where / f"fifo-{k}.json")))
            expected.add(args[-1], None, {"not_a_file"})
        else:
            manifest = where / "lists" / f"m{k}.json"
            manifest.parent.mkdir(exist_ok=True)
            text = []
            for number, (line, value) in enumerate(param, start=1):
                origin = f"{manifest}:{number}"
                if line == "blank":
                    text.append("   ")
                elif line == "junk":
                    text.append(value)
                    expected.add(None, origin, {"bad_manifest_line"})
                else:
                    name = names[value % len(names)] if line != "missing" else f"missing {value}.wav"
                    path = str(folder / name) if line == "abs" else f"../in/{name}"
                    text.append(json.dumps({"audio_filepath": path, "origin": origin}))
                    expected.file(name, origin)
            manifest.write_text("\n".join(text) + "\n")
            if not any(line != "blank" for line, _ in param):
                expected.add(str(manifest), None, {"bad_manifest"})
            args.append(str(manifest))
    return args, expected


def check_accounting(out: Path, expected: Expected) -> tuple[list[dict], list[dict]]:
    """Every input in exactly one of transcripts.json and rejected.jsonl, each file in input order, as it may end."""
    lines, rejected = read_jsonl(out / "transcripts.json"), read_jsonl(out / "rejected.jsonl")
    written = [((line["audio_filepath"], line.get("origin")), "ok") for line in lines]
    refused = [((r["audio_filepath"], f"{r['manifest']}:{r['line']}" if "line" in r else None), r["reason"])
               for r in rejected]  # fmt: skip
    for key, allowed in expected.entries:
        queue = written if written and written[0][0] == key and "ok" in allowed else refused
        assert queue and queue[0][0] == key, f"{key} ({allowed}): next written {written[:1]}, refused {refused[:1]}"
        assert queue.pop(0)[1] in allowed, f"{key}: {allowed}"
    assert not written and not refused, "more lines than inputs"
    return lines, rejected


def check_hostile_inputs(spec: dict[str, tuple], chosen: list[tuple], opts: dict, model: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="habla-transcribe-hostile-") as where:
        where = Path(where)
        materialize(where / "in", spec)
        args, expected = write_arguments(where, spec, chosen)
        flags = ["--batch-size", opts["batch"], *["--timestamps"] * opts["timestamps"]]
        flags += ["--confidence"] * opts["confidence"]
        if opts["window"]:
            flags += ["--window", opts["window"][0], "--context", opts["window"][1]]
        code, err = run_cli("--model", str(model), "--out", str(where / "out"), *flags, "--", *args)
        assert code in (0, 2) and "Traceback" not in err and len(err.splitlines()) <= 1, err
        lines, rejected = check_accounting(where / "out", expected)
        assert (code == 2) == (not lines), err
        if code == 2:
            one_error_line(err, "no input could be transcribed", "rejected.jsonl")
        else:
            assert err == ""
        assert {r["reason"] for r in rejected} <= DOCUMENTED_REASONS
        for line in lines:
            assert line["pred_text"] == " ".join(line["pred_text"].split())
            if opts["timestamps"]:
                assert len(line["word"]) == len(line["pred_text"].split())
            if opts["confidence"]:
                assert len(line["word_confidence"]) == len(line["pred_text"].split())
        summary = json.loads((where / "out" / "summary.json").read_text())
        assert (summary["files"], summary["rejected"]) == (len(lines), len(rejected))
        event(f"exit {code}")
        for reason in {r["reason"] for r in rejected}:
            event(f"rejected as {reason}")


def profile(**overrides) -> settings:
    return settings(
        **{**PROFILES[PROFILE], **overrides},
        database=None,  # nothing written into the repository
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],  # no slow "explain"
        print_blob=True,
    )


@pytest.fixture
def model(tiny_model, one_thread) -> Path:
    return tiny_model


@pytest.mark.slow
def test_hostile_inputs_keep_every_promise(model):
    @profile()
    @given(spec=files(), chosen=arguments, opts=options)
    def check(spec, chosen, opts):
        check_hostile_inputs(spec, chosen, opts, model)

    check()


@pytest.mark.slow
@pytest.mark.hostile_long
def test_hostile_inputs_keep_every_promise_long(model):
    @profile(max_examples=PROFILES["long"]["max_examples"], deadline=None, derandomize=False)
    @given(spec=files(), chosen=arguments, opts=options)
    def check(spec, chosen, opts):
        check_hostile_inputs(spec, chosen, opts, model)

    check()
