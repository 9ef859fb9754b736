"""habla train's input checks against the hostile inputs of the data-integrity issue (#9): each becomes one
line and exit 2 before training, never a traceback mid-fit."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from conftest import run_habla, write_manifest

from habla.core.errors import HablaError
from habla.training import config as train_config
from habla.training import manifests as nemo_data


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
