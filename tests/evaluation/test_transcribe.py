"""habla transcribe: inputs of every kind, the same text as NeMo's own transcribe(), long recordings in windows.

The windowing is checked exactly with a stand-in model whose output names the frame it came from; the rest
runs a real NeMo model trained in this session (tests/fixtures/training.py ``tiny_model``).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fixtures.commands import read_jsonl, run_habla, write_manifest

from habla.evaluation import transcribe as tr
from habla.evaluation.inputs import AudioInput, collect_inputs, read_audio
from habla.evaluation.runners import CtcRunner
from habla.evaluation.windows import CONTEXT_S, WINDOW_S, plan_windows
from habla.speech import audio


class _FrameNamingRunner:
    """A CtcRunner stand-in: frame outputs whose k-th value is the global index of the frame the window's k-th
    output frame covers (read from the samples, which hold their own positions)."""

    rate, frame_samples = 16000, 320  # 10 ms hop x subsampling 2, as tiny_ctc_char

    def __init__(self):
        self.windows = []

    def frame_outputs(self, windows):
        import torch

        self.windows += [(int(w[0]), int(w[-1]) + 1) for w in windows]
        return [torch.tensor(w[:: self.frame_samples] // self.frame_samples, dtype=torch.float64) for w in windows]

    def decode(self, frames):
        return frames.long().tolist(), None, None


def streamed(samples, block: int):
    """A stand-in for transcribe.stream_audio: ``samples`` as a stream of ``block``-sample blocks."""

    @contextlib.contextmanager
    def stream_audio(uri, rate):
        yield (samples[i : i + block] for i in range(0, len(samples), block))

    return stream_audio


@pytest.mark.parametrize("block", [1000, 44_100, 10**8])
@pytest.mark.parametrize("seconds", [0.3, 27.9, 28.1, 61.0, 600.0])
def test_windows_keep_every_frame_exactly_once(seconds, block, monkeypatch):
    """Windows cut from a stream, whatever its blocks: every frame kept once, in order, and the windows are
    those planned for the whole recording (as when it was read whole)."""
    samples = np.arange(int(seconds * 16000), dtype=np.float64)
    monkeypatch.setattr(tr, "stream_audio", streamed(samples, block))
    runner = _FrameNamingRunner()
    ((_, result),) = list(tr.transcribe_inputs(runner, [AudioInput("x.wav")], batch_size=3))
    frames = -(-len(samples) // runner.frame_samples)
    assert result.text == list(range(frames))  # in order, no gap, no frame twice
    assert result.duration == len(samples) / 16000
    plans = plan_windows(len(samples), runner.frame_samples, WINDOW_S, CONTEXT_S, runner.rate)
    assert runner.windows == [(start, end) for start, end, _, _ in plans]
    assert max(end - start for start, end, _, _ in plans) <= (WINDOW_S + 2 * CONTEXT_S) * 16000
    assert (len(plans) == 1) == (seconds <= 28) and len(plans) <= -(-frames // 1000)


def test_inputs_files_folders_globs_manifests_and_bad_ones(tmp_path, mini_copy):
    clips = sorted((mini_copy / "clips").glob("*.mp3"))[:3]
    manifest = write_manifest([{"audio_filepath": f"../release/es/clips/{clips[2].name}", "text": "hola"}],
                              tmp_path / "m" / "list.json")  # fmt: skip
    found = collect_inputs([str(clips[1]), str(mini_copy / "clips" / "*_4000000[12].mp3"), str(manifest),
                               str(mini_copy / "clips")])  # fmt: skip
    assert [f.uri for f in found[:4]] == [str(clips[1]), str(clips[0]), str(clips[1]), str(clips[2])]  # glob sorted
    assert found[3].fields["text"] == "hola" and found[3].origin == {"manifest": str(manifest), "line": 1}
    assert [f.uri for f in found[4:]] == [str(c) for c in sorted((mini_copy / "clips").glob("*.mp3"))]
    assert not any(f.problem for f in found)  # a file named twice is two recordings
    bad = [
        (tmp_path / "nope.wav", "missing_file"),
        (tmp_path / "m", "empty_folder"),
        (tmp_path / "*.flac", "missing_file"),
    ]
    assert [(f.uri, f.problem[0]) for f in collect_inputs([str(b) for b, _ in bad])] == [(str(b), r) for b, r in bad]


@pytest.mark.slow
def test_transcripts_equal_nemo_transcribe_on_the_bundled_test_split(tiny_model, tmp_path, one_thread):
    from fixtures.releases import MINI
    from nemo.collections.asr.models import ASRModel

    from habla.data.options import PrepareOptions
    from habla.data.prepare import prepare

    prepare(str(MINI), str(tmp_path / "data"), PrepareOptions(shards=1, splits=("test",)), workers=1)
    manifest = tmp_path / "data" / "manifests" / "test.json"
    entries = read_jsonl(manifest)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really")
    missing = tmp_path / "gone.wav"
    # --model: the training output folder stands for its model.nemo
    result = run_habla("transcribe", "--model", str(tiny_model.parent), "--out", str(tmp_path / "out"),
                       "--timestamps", "--confidence", str(manifest), str(broken), str(missing))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    console = (result.stdout + result.stderr).splitlines()
    assert len(console) <= 4 and "[NeMo" not in result.stdout + result.stderr, console  # the answer, not NeMo's noise
    assert "[NeMo" in (tmp_path / "out" / "transcribe.log").read_text()
    lines = read_jsonl(tmp_path / "out" / "transcripts.json")
    assert [line["audio_filepath"] for line in lines] == [e["audio_filepath"] for e in entries]
    assert all(line["text"] == e["text"] and line["client_id"] == e["client_id"] for line, e in zip(lines, entries))
    for line in lines:
        assert len(line["word"]) == len(line["pred_text"].split()) == len(line["word_confidence"])
        assert all(0 <= w["start"] <= w["end"] <= line["duration"] + 0.05 for w in line["word"])
        assert all(0.0 <= c <= 1.0 for c in line["word_confidence"])
        assert line["pred_text"] == " ".join(line["pred_text"].split())  # single spaces, none around
    rejected, gone = read_jsonl(tmp_path / "out" / "rejected.jsonl")  # a missing input does not stop the batch
    assert rejected["audio_filepath"] == str(broken) and rejected["reason"] == "decode_error"
    assert gone["audio_filepath"] == str(missing) and gone["reason"] == "missing_file"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["files"] == len(entries) and summary["rejected"] == 2 and summary["rtfx"] > 1
    # subtitles: one SRT and one WebVTT per recording, their cues the transcript's words in order
    subtitles = sorted((tmp_path / "out" / "subtitles").iterdir())
    assert len(subtitles) == 2 * len(lines)
    for k, line in enumerate(lines, 1):
        stem = Path(line["audio_filepath"]).stem
        srt = (tmp_path / "out" / "subtitles" / f"{k:04d}-{stem}.srt").read_text()
        vtt = (tmp_path / "out" / "subtitles" / f"{k:04d}-{stem}.vtt").read_text()
        assert vtt.startswith("WEBVTT\n\n")
        cue_lines = [x for x in srt.splitlines() if x and not x.isdigit() and "-->" not in x]
        assert " ".join(cue_lines) == line["pred_text"]
        assert all(re.fullmatch(r"\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}", x) for x in srt.splitlines()
                   if "-->" in x)  # fmt: skip
    assert summary["device"] == "cpu" and json.loads(result.stdout.splitlines()[-1])["files"] == len(entries)

    nemo = ASRModel.restore_from(str(tiny_model), map_location="cpu")
    expected = nemo.transcribe([e["audio_filepath"] for e in entries], batch_size=4, verbose=False)
    assert [line["pred_text"] for line in lines] == [h.text if hasattr(h, "text") else h for h in expected]


@pytest.mark.slow
def test_a_ten_minute_recording_in_windows(tiny_model, train_clips, tmp_path, monkeypatch, one_thread):
    """A 10-minute FLAC is transcribed in windows of at most 28 s of audio (what bounds the model's memory,
    whatever the recording's length), with timestamps over the whole recording."""
    clips = [sf.read(e["audio_filepath"], dtype="float32")[0] for e in train_clips[:40]]
    pause = np.zeros(8000, dtype=np.float32)
    pieces, total = [], 0
    while total < 600 * 16000:
        for clip in clips:
            pieces += [clip, pause]
            total += len(clip) + len(pause)
    sf.write(tmp_path / "long.flac", np.concatenate(pieces)[: 600 * 16000], 16000)
    seen = []
    log_probs = CtcRunner.log_probs
    monkeypatch.setattr(CtcRunner, "log_probs", lambda self, windows: seen.extend(map(len, windows))
                        or log_probs(self, windows))  # fmt: skip
    summary = tr.transcribe(str(tiny_model), [str(tmp_path / "long.flac")], str(tmp_path / "out"), timestamps=True)
    (line,) = read_jsonl(tmp_path / "out" / "transcripts.json")
    assert line["duration"] == 600.0 and line["pred_text"] and summary["files"] == 1
    assert seen[0] == 16000  # the model's check: a second of quiet noise
    assert len(seen[1:]) == 30 and max(seen[1:]) <= (WINDOW_S + 2 * CONTEXT_S) * 16000
    assert 575 < line["word"][-1]["end"] <= 600.05  # the last window (the last 24 s) has words too
    starts = [w["start"] for w in line["word"]]
    assert starts == sorted(starts)
    print(f"10-minute file: {summary['transcribe_seconds']:.1f} s, {summary['rtfx']}x real time")


def test_inputs_from_s3_globs_folders_and_manifests(s3_bucket, mini_copy):
    from habla.core import storage

    clips = sorted((mini_copy / "clips").glob("*.mp3"))[:3]
    for clip in clips:
        storage.upload_file(clip, f"{s3_bucket}/in/clips/{clip.name}")
    storage.write_text(f"{s3_bucket}/in/list.jsonl", json.dumps({"audio_filepath": f"clips/{clips[2].name}"}) + "\n")
    found = collect_inputs([f"{s3_bucket}/in/clips/*_4000000[12].mp3", f"{s3_bucket}/in/list.jsonl",
                               f"{s3_bucket}/in/clips"])  # fmt: skip
    uris = [f"{s3_bucket}/in/clips/{c.name}" for c in clips]
    assert [f.uri for f in found] == uris + uris  # glob and manifest, then the folder: each as often as named
    samples = read_audio(found[0].uri, 16000)
    assert samples.dtype == np.float32 and 0.5 < len(samples) / 16000 < 20
    (nothing,) = collect_inputs([f"{s3_bucket}/in/*.flac"])
    assert nothing.problem[0] == "missing_file"
    with pytest.raises(audio.AudioRejected, match="missing_file"):
        read_audio(f"{s3_bucket}/in/clips/nope.mp3", 16000)
