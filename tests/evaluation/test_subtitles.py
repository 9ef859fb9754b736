"""Subtitles from word timestamps (habla transcribe --timestamps), and the folders --model stands for."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from habla.core.errors import HablaError
from habla.evaluation import subtitles
from habla.speech.models import model_in_folder

words = st.lists(
    st.tuples(st.text("abcdefghijklmnñopqrstuvwxyzáéíóú", min_size=1, max_size=30), st.floats(0, 3), st.floats(0, 2)),
    max_size=60,
)


def _timed(drawn) -> list[dict]:
    out, clock = [], 0.0
    for text, pause, length in drawn:
        start = clock + pause
        out.append({"word": text, "start": round(start, 3), "end": round(start + length, 3)})
        clock = start + length
    return out


@settings(max_examples=200, deadline=None)
@given(drawn=words)
def test_cues_keep_every_word_in_order_within_limits(drawn):
    timed = _timed(drawn)
    cues = subtitles.cues(timed)
    assert " ".join(text for _, _, text in cues) == " ".join(w["word"] for w in timed)
    for k, (start, end, text) in enumerate(cues):
        assert start <= end
        assert len(text) <= subtitles.MAX_CHARS or " " not in text  # only a single long word exceeds a line
        if k + 1 < len(cues):
            assert end <= cues[k + 1][0]  # cues never overlap
    srt, vtt = subtitles.srt(timed), subtitles.vtt(timed)
    assert srt.count(" --> ") == vtt.count(" --> ") == len(cues) and vtt.startswith("WEBVTT\n\n")


def test_a_cue_clock():
    srt = subtitles.srt(
        [{"word": "hola", "start": 3661.5, "end": 3662.25}, {"word": "qué", "start": 3662.3, "end": 3663}]
    )
    assert srt == "1\n01:01:01,500 --> 01:01:03,000\nhola qué\n"


def test_a_folder_stands_for_its_model(tmp_path):
    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    (out / "models" / "best.json").write_text(json.dumps({"run": "a", "model": "/m/best.nemo"}))
    assert model_in_folder(str(out)) == "/m/best.nemo"  # a pipeline's output: its best model
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "model.nemo").write_bytes(b"x")
    assert model_in_folder(str(run)) == str(run / "model" / "model.nemo")  # a run folder: its trained model
    assert model_in_folder(str(run / "model")) == str(run / "model" / "model.nemo")  # a training output
    assert model_in_folder(str(tmp_path / "m.nemo")) == str(tmp_path / "m.nemo")
    with pytest.raises(HablaError, match="a folder without a model"):
        model_in_folder(str(tmp_path / "run" / "model" / ".." / "..") + "/out/models")
