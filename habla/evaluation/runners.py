"""Loading a NeMo ``.nemo`` model and running its CTC or transducer head over windows of audio.

Supported models: CTC (``EncDecCTCModel``, ``EncDecCTCModelBPE``), hybrid RNNT/CTC (either head: ``--decoder
rnnt``, their default and what NVIDIA's model cards report, or ``--decoder ctc``) and transducers
(``EncDecRNNTModel[BPE]``). The transducer head (:class:`RnntRunner`) decodes the encoder's frames, cut from
windows by the same rule and laid end to end, with NeMo's greedy RNNT decoding; a recording of one window is
NeMo's ``model.transcribe``. Timestamps and confidence come from the CTC head (:class:`CtcRunner`). Any other
class, a file that is not a ``.nemo`` (corrupt, truncated, something else) and a model whose outputs are not
finite numbers are refused with a one-line error (exit 2) before anything is written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from habla.core import progress, storage, untrusted
from habla.core.errors import HablaError, one_line
from habla.speech import models

#: The largest ``model_config.yaml`` read from a ``.nemo`` (a real one is a few kB).
MAX_MODEL_CONFIG_BYTES = 16 << 20
#: The classes CtcRunner runs: CTC models, and hybrid RNNT/CTC models through their CTC head.
CTC_MODELS = ("EncDecCTCModel", "EncDecCTCModelBPE")
HYBRID_MODELS = ("EncDecHybridRNNTCTCModel", "EncDecHybridRNNTCTCBPEModel")
TRANSDUCER_MODELS = ("EncDecRNNTModel", "EncDecRNNTBPEModel")
DECODERS = ("rnnt", "ctc")


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


class _Runner:
    """What both heads share: the model's front end set up as NeMo's transcribe() sets it, and the frame geometry
    the windows follow."""

    def _ready_for_inference(self, model) -> None:
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


class CtcRunner(_Runner):
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
        self._ready_for_inference(model)
        _refuse_non_finite(self, "outputs (NaN or infinite log-probabilities)")

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


class RnntRunner(_Runner):
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
        self._ready_for_inference(model)
        _refuse_non_finite(self, "outputs")

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
