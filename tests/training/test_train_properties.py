"""Property test of ``habla train`` under hostile input (hypothesis, slow): manifests mixing real clips with
broken audio (missing, not audio, NaN samples, stereo, empty), bad lines and odd text; overrides that are fine,
mistyped, out of range or nonsense; and output folders that already hold another run. Whatever it is given,
``habla train`` exits 0 or 2, explains a refusal in one line, never shows a traceback, and never publishes or
replaces a model it did not train from a sound start."""

from __future__ import annotations

import contextlib
import io
import json
import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from habla import cli

pytestmark = pytest.mark.slow

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
EXAMPLES = {"ci": 8, "long": 80}[PROFILE]

BROKEN = ("missing", "not_audio", "nan", "stereo", "empty", "folder")
OVERRIDES = ["trainer.max_steps=2", "model.optim.lr=0.01", "model.optim.lr=-1", "model.optim.name=adamx",
             "trainer.devices=-3", "trainer.max_step=2", "model.optim.lr=abc", "trainer.max_steps=true",
             "model.train_ds.batch_size=0", "+trainer.accumulate_grad_batches=0", "model.labels=[a]", "x"]  # fmt: skip
BEFORE = ("empty", "model_without_checkpoint", "another_config_claim")


def _broken(kind: str, path: Path) -> None:
    if kind == "not_audio":
        path.write_bytes(b"<html>not audio</html>")
    elif kind in ("nan", "stereo", "empty"):
        samples = {"nan": np.full(1600, np.nan), "stereo": np.zeros((1600, 2)), "empty": np.zeros(0)}[kind]
        sf.write(path, samples.astype(np.float32), 16000, subtype="FLOAT" if kind == "nan" else "PCM_16")
    elif kind == "folder":
        path.mkdir()


@st.composite
def cases(draw) -> dict:
    lines = [("real", k) for k in range(draw(st.integers(1, 4)))]
    lines += [(draw(st.sampled_from(BROKEN)), k) for k in range(draw(st.integers(0, 2)))]
    extra = draw(st.lists(st.sampled_from(["not_json", "no_text", "nan_duration", "empty_text", "odd_text"]),
                          max_size=1))  # fmt: skip
    overrides = ["trainer.max_steps=2", *draw(st.lists(st.sampled_from(OVERRIDES), max_size=2))]
    return {"lines": lines, "extra": extra, "overrides": overrides, "resume": draw(st.booleans()),
            "before": draw(st.sampled_from(BEFORE))}  # fmt: skip


def _manifest(case: dict, where: Path, clips: list[dict]) -> Path:
    text = []
    for kind, k in case["lines"]:
        entry = dict(clips[k])
        if kind != "real":
            entry["audio_filepath"] = str(where / f"{kind}-{k}.wav")
            _broken(kind, Path(entry["audio_filepath"]))
        text.append(json.dumps(entry, ensure_ascii=False))
    base = clips[0]
    for kind in case["extra"]:
        text.append({"not_json": '{"audio_filepath": ', "no_text": json.dumps({**base, "text": None}),
                     "nan_duration": json.dumps(base)[:-1] + ', "duration": NaN}',
                     "empty_text": json.dumps({**base, "text": ""}),
                     "odd_text": json.dumps({**base, "text": "<b>hola</b> 42 ∑"})}[kind])  # fmt: skip
    path = where / "train.json"
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


@settings(max_examples=EXAMPLES, deadline=timedelta(minutes=3), derandomize=PROFILE == "ci", database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(case=cases())
def test_train_never_crashes_and_never_publishes_a_model_it_should_not(case, train_clips, tmp_path_factory, cache,
                                                                     one_thread):  # fmt: skip
    where = tmp_path_factory.mktemp("train")
    manifest = _manifest(case, where, train_clips)
    out = where / "out"
    if case["before"] == "model_without_checkpoint":
        out.mkdir()
        (out / "model.nemo").write_bytes(b"someone else's finished model")
    elif case["before"] == "another_config_claim":
        out.mkdir()
        claim = {"config": "quartznet15x5_char", "init_from": "", "model_overrides": [], "by": "x", "at": "y"}
        (out / "claim.json").write_text(json.dumps(claim))
    model_before = (out / "model.nemo").read_bytes() if (out / "model.nemo").exists() else None
    args = ["train", "--config", "tiny_ctc_char", "--train-manifest", str(manifest), "--val-manifest", str(manifest),
            "--out", str(out), *case["overrides"], *(["--resume"] if case["resume"] else [])]  # fmt: skip
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(args)
    err = stderr.getvalue()
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("habla train: error:")]
    event(f"exit {code}")
    if code == 2:
        assert len(errors) == 1, err[-2000:]
        after = (out / "model.nemo").read_bytes() if (out / "model.nemo").exists() else None
        assert after == model_before, "a refused run published or replaced a model"
        return
    assert code == 0 and not errors, err[-2000:]
    assert all(kind == "real" for kind, _ in case["lines"]), "broken audio was trained on"
    assert case["before"] == "empty", "a folder of another run was trained over"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and (out / "model.nemo").stat().st_size > 10_000
