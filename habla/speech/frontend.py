"""Use a habla ONNX export without NeMo or torch: numpy (and librosa for the mel filters) compute the model's
features, onnxruntime runs the graph, greedy CTC decoding with the vocabulary turns its output into text.

The ONNX file (``OUT/models/<run>/model.onnx``) carries what this needs in its metadata (``metadata_props``):
``habla.front_end`` (JSON: sample rate, FFT size, window and hop in samples, mel bands, pre-emphasis, log guard,
normalisation) and ``habla.vocabulary`` (JSON list; the CTC blank is the index after the last). The front end
is NeMo's ``AudioToMelSpectrogramPreprocessor`` at inference (no dither): pre-emphasis 0.97, a centred STFT
(zero padding) with a symmetric Hann window, power spectrum, Slaney mel filters, ``log(x + 2**-24)``, each
band normalised to mean 0 and standard deviation 1 over the recording's frames (``len // hop`` of them)::

    import onnxruntime, soundfile
    from habla.speech.frontend import transcribe_onnx

    session = onnxruntime.InferenceSession("model.onnx")
    samples, rate = soundfile.read("audio.wav", dtype="float32")   # mono, at the model's sample rate (16 kHz)
    print(transcribe_onnx(session, samples))

Imports nothing of NeMo or torch (tests/evaluation/test_package.py checks it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

FRONT_END_KEY = "habla.front_end"
VOCABULARY_KEY = "habla.vocabulary"


@dataclass(frozen=True)
class FrontEnd:
    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 320
    hop_length: int = 160
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float | None = None
    mel_norm: str | None = "slaney"
    preemph: float | None = 0.97
    mag_power: float = 2.0
    log_guard: float = 2.0**-24
    normalize: str = "per_feature"

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FrontEnd:
        return cls(**json.loads(text))


def metadata(session) -> tuple[FrontEnd, list[str]]:
    """The front end and vocabulary an onnxruntime session's model carries."""
    props = session.get_modelmeta().custom_metadata_map
    return FrontEnd.from_json(props[FRONT_END_KEY]), json.loads(props[VOCABULARY_KEY])


def log_mel(samples: np.ndarray, fe: FrontEnd) -> np.ndarray:
    """``[1, n_mels, frames]`` float32 features of a mono recording (float samples in [-1, 1])."""
    import librosa

    x = np.asarray(samples, dtype=np.float64)
    if fe.preemph:
        x = np.concatenate([x[:1], x[1:] - fe.preemph * x[:-1]])
    frames = len(x) // fe.hop_length
    pad = fe.n_fft // 2
    padded = np.pad(x, (pad, pad))
    window = np.zeros(fe.n_fft)
    start = (fe.n_fft - fe.win_length) // 2
    window[start : start + fe.win_length] = np.hanning(fe.win_length)  # symmetric, as torch's periodic=False
    count = 1 + (len(padded) - fe.n_fft) // fe.hop_length
    index = np.arange(fe.n_fft)[None, :] + fe.hop_length * np.arange(count)[:, None]
    spectrum = np.abs(np.fft.rfft(padded[index] * window, n=fe.n_fft, axis=1)) ** fe.mag_power  # [count, bins]
    filters = librosa.filters.mel(sr=fe.sample_rate, n_fft=fe.n_fft, n_mels=fe.n_mels, fmin=fe.fmin,
                                  fmax=fe.fmax or fe.sample_rate / 2, norm=fe.mel_norm)  # fmt: skip
    features = np.log(filters @ spectrum.T + fe.log_guard)[:, :frames]  # [n_mels, frames]
    if fe.normalize == "per_feature" and frames > 1:
        mean = features.mean(axis=1, keepdims=True)
        std = features.std(axis=1, ddof=1, keepdims=True) + 1e-5
        features = (features - mean) / std
    return features[None].astype(np.float32)


def greedy_ctc(logprobs: np.ndarray, vocabulary: list[str]) -> str:
    """Greedy CTC decoding of ``[frames, len(vocabulary) + 1]`` scores: best label per frame, repeats merged,
    the blank (the last index) dropped; words separated by single spaces."""
    best = logprobs.argmax(axis=-1)
    blank = len(vocabulary)
    out, previous = [], None
    for label in best:
        if label != previous and label != blank:
            out.append(vocabulary[label])
        previous = label
    return " ".join("".join(out).split())


def transcribe_onnx(session, samples: np.ndarray) -> str:
    """The text of one mono recording at the model's sample rate, with an onnxruntime session of a habla export."""
    fe, vocabulary = metadata(session)
    features = log_mel(samples, fe)
    feed = {"audio_signal": features, "length": np.array([features.shape[-1]], dtype=np.int64)}
    names = [i.name for i in session.get_inputs()]
    logprobs = session.run(None, {name: feed[name] for name in names})[0][0]
    return greedy_ctc(logprobs, vocabulary)
