"""habla train's input checks against the hostile inputs of the data-integrity issue (#9): each becomes one
line and exit 2 before training, never a traceback mid-fit."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from fixtures.commands import run_habla, write_manifest

from habla.core.errors import HablaError
from habla.speech import manifests as nemo_data
from habla.training import config as train_config


@pytest.mark.parametrize(
    ("override", "message"),
    [("model.optim.lr=abc", "expects a number (the config has 0.02), got 'abc'"),
     ("model.optim.lr=.inf", "not a finite number"), ("trainer.max_steps=true", "expects a number"),
     ("trainer.max_steps=[1]", "expects a number"), ("model.labels=abc", "expects a list"),
     ("model.optim=5", "expects a mapping"), ("model.train_ds.batch_size=0", "batch_size must be a positive integer")],
)  # fmt: skip
def test_overrides_keep_the_config_value_types(override, message):
    with pytest.raises(HablaError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        train_config.load("tiny_ctc_char", [override])


def test_overrides_that_fit_are_taken():
    cfg = train_config.load(
        "tiny_ctc_char",
        ["model.optim.lr=1e-3", "trainer.max_steps=10", "model.spec_augment=null", "trainer.precision=32"],
    )
    assert cfg.model.optim.lr == 0.001 and cfg.model.spec_augment is None


def test_a_mistyped_override_is_one_line_on_the_command_line(tmp_path):
    manifest = write_manifest([{"audio_filepath": "a.wav", "duration": 1.0, "text": "a"}], tmp_path / "m.json")
    result = run_habla("train", "--config", "tiny_ctc_char", "--train-manifest", str(manifest), "--val-manifest",
                       str(manifest), "--out", str(tmp_path / "out"), "model.optim.lr=abc")  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("habla train: error:")]
    assert len(errors) == 1 and "model.optim.lr=abc" in errors[0]


@pytest.mark.parametrize(
    ("duration", "message"),
    [("NaN", "line 2 is not JSON (NaN is not a JSON number)"), ("Infinity", "not JSON"), ("-1.5", "positive finite"),
     ("0", "positive finite"), ("true", "positive finite"), ('"3.2"', "positive finite")],
)  # fmt: skip
def test_manifest_durations_must_be_positive_finite_numbers(duration, message):
    text = '{"audio_filepath": "a.wav", "duration": 1.0, "text": "a"}\n'
    text += '{"audio_filepath": "b.wav", "duration": ' + duration + ', "text": "b"}\n'
    with pytest.raises(HablaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        nemo_data.parse_manifest(text, "m.json")


def test_every_audio_file_is_checked_not_a_sample(tmp_path):
    """A non-audio file at line 2 passed the 3-file sample and failed mid-fit."""
    wav = io.BytesIO()
    sf.write(wav, np.zeros(1600, dtype=np.float32), 16000, format="WAV")
    entries = []
    for k in range(40):
        path = tmp_path / f"{k}.wav"
        path.write_bytes(b"<html>not audio</html>" if k in (1, 27) else wav.getvalue())
        entries.append({"audio_filepath": str(path), "duration": 0.1, "text": "a", "_line": k + 1})
    with pytest.raises(HablaError, match=r"line 2: .*1\.wav: not readable audio .*\(and 1 more\)"):
        nemo_data.check_audio_readable(entries)
    nemo_data.check_audio_readable([e for k, e in enumerate(entries) if k not in (1, 27)])


# ------------------------------------------------------------------ round 2 (#22): no failed run reported as success


def _wav(samples, channels: int = 1, subtype: str = "PCM_16") -> bytes:
    data = np.asarray(samples, dtype=np.float32)
    if channels > 1:
        data = np.stack([data] * channels, axis=1)
    out = io.BytesIO()
    sf.write(out, data, 16000, format="WAV", subtype=subtype)
    return out.getvalue()


@pytest.mark.parametrize(
    ("audio", "message"),
    [(_wav(np.full(1600, np.nan), subtype="FLOAT"), "samples that are not finite numbers"),
     (_wav(np.r_[np.zeros(800), np.inf, np.zeros(799)], subtype="DOUBLE"), "samples that are not finite numbers"),
     (_wav(np.zeros(1600), channels=2), "2 channels: habla trains on mono audio")],
)  # fmt: skip
def test_audio_a_model_cannot_learn_from_is_refused_with_the_clip_named(tmp_path, audio, message):
    """A WAV of NaN samples trained a model of NaNs that exited 0; a stereo WAV was a traceback."""
    good = tmp_path / "good.wav"
    good.write_bytes(_wav(np.random.default_rng(0).normal(0, 0.1, 1600), subtype="FLOAT"))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(audio)
    entries = [
        {"audio_filepath": str(p), "duration": 0.1, "text": "a", "_line": k + 1} for k, p in enumerate((good, bad))
    ]
    with pytest.raises(HablaError, match=f"line 2: .*bad.wav: {message}"):
        nemo_data.check_audio_readable(entries)
    nemo_data.check_audio_readable(entries[:1])


@pytest.mark.parametrize(
    ("override", "message"),
    [("model.optim.lr=-0.1", "model.optim.lr is -0.1; it must be a learning rate above 0"),
     ("model.optim.name=adamx", "model.optim.name is 'adamx'; it must be one of adadelta"),
     ("trainer.devices=-3", "trainer.devices is -3"), ("trainer.num_nodes=0", "trainer.num_nodes is 0"),
     ("+trainer.accumulate_grad_batches=0", "accumulate_grad_batches is 0"),
     ("model.sample_rate=0", "model.sample_rate is 0")],
)  # fmt: skip
def test_values_that_would_break_training_are_refused_before_it(override, message):
    with pytest.raises(HablaError, match=message):
        train_config.load("tiny_ctc_char", [override])


def test_habla_knows_every_optimizer_nemo_has():
    from nemo.core.optim.optimizers import AVAILABLE_OPTIMIZERS

    assert set(train_config.OPTIMIZERS) == set(AVAILABLE_OPTIMIZERS)


def test_a_loss_that_is_not_a_number_stops_training_on_every_rank():
    """The loss is summed over ranks before the check, so every rank stops at the same step."""
    import torch

    from habla.training.callbacks import TrainingProgress

    class Strategy:
        def reduce(self, value, reduce_op):
            return value

    class Trainer:
        strategy, global_step, is_global_zero, log_every_n_steps = Strategy(), 7, True, 50

    progress = TrainingProgress(16000, 100)
    batch = (torch.zeros(2, 16000), torch.tensor([16000, 8000]))
    progress.on_train_batch_end(Trainer(), None, {"loss": torch.tensor(2.5)}, batch, 0)
    with pytest.raises(HablaError, match="training loss is not a finite number at step 7 .*nothing was published"):
        progress.on_train_batch_end(Trainer(), None, {"loss": torch.tensor(float("nan"))}, batch, 1)
