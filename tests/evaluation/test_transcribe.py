"""habla transcribe: inputs of every kind, the same text as NeMo's own transcribe(), long recordings in windows.

The windowing is checked exactly with a stand-in model whose output names the frame it came from; the rest
runs a real NeMo model trained in this session (tests/conftest.py ``tiny_model``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from conftest import read_jsonl, run_habla, write_manifest

from habla.evaluation import transcribe as tr


class _FrameNamingRunner:
    """A CtcRunner stand-in: 'log-probs' whose row k is the global index of the frame the window's k-th
    output frame covers (read from the samples, which hold their own positions)."""

    rate, frame_samples = 16000, 320  # 10 ms hop x subsampling 2, as tiny_ctc_char

    def log_probs(self, windows):
        import torch

        return [torch.tensor(w[:: self.frame_samples] // self.frame_samples, dtype=torch.float64)[:, None]
                for w in windows]  # fmt: skip

    def decode(self, logits):
        return logits[:, 0].long().tolist(), None, None


@pytest.mark.parametrize("seconds", [0.3, 27.9, 28.1, 61.0, 600.0])
def test_windows_keep_every_frame_exactly_once(seconds, monkeypatch):
    samples = np.arange(int(seconds * 16000), dtype=np.float64)
    monkeypatch.setattr(tr, "read_audio", lambda uri, rate: samples)
    runner = _FrameNamingRunner()
    ((_, result),) = list(tr.transcribe_inputs(runner, [tr.AudioInput("x.wav")], batch_size=3))
    frames = -(-len(samples) // runner.frame_samples)
    assert result.text == list(range(frames))  # in order, no gap, no frame twice
    plans = tr.plan_windows(len(samples), runner.frame_samples, tr.WINDOW_S, tr.CONTEXT_S, runner.rate)
    assert max(end - start for start, end, _, _ in plans) <= (tr.WINDOW_S + 2 * tr.CONTEXT_S) * 16000
    assert (len(plans) == 1) == (seconds <= 28) and len(plans) <= -(-frames // 1000)


def test_inputs_files_folders_globs_manifests_and_bad_ones(tmp_path, mini_copy):
    clips = sorted((mini_copy / "clips").glob("*.mp3"))[:3]
    manifest = write_manifest([{"audio_filepath": f"../release/es/clips/{clips[2].name}", "text": "hola"}],
                              tmp_path / "m" / "list.json")  # fmt: skip
    found = tr.collect_inputs([str(clips[1]), str(mini_copy / "clips" / "*_4000000[12].mp3"), str(manifest),
                               str(mini_copy / "clips")])  # fmt: skip
    assert [f.uri for f in found[:3]] == [str(clips[1]), str(clips[0]), str(clips[2])]  # the glob sorted
    assert found[2].fields["text"] == "hola"  # a manifest's relative path is relative to the manifest
    assert len(found) == len(list((mini_copy / "clips").glob("*.mp3")))  # each recording once
    for bad, message in ((tmp_path / "nope.wav", "no such file"), (tmp_path / "m", "no audio file"),
                         (tmp_path / "*.flac", "no audio file matches")):  # fmt: skip
        with pytest.raises(tr.HablaError, match=message):
            tr.collect_inputs([str(bad)])


@pytest.mark.slow
def test_transcripts_equal_nemo_transcribe_on_the_bundled_test_split(tiny_model, tmp_path, one_thread):
    from conftest import MINI
    from nemo.collections.asr.models import ASRModel

    from habla.data.options import PrepareOptions
    from habla.data.prepare import prepare

    prepare(str(MINI), str(tmp_path / "data"), PrepareOptions(shards=1, splits=("test",)), workers=1)
    manifest = tmp_path / "data" / "manifests" / "test.json"
    entries = read_jsonl(manifest)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really")
    result = run_habla("transcribe", "--model", str(tiny_model), "--out", str(tmp_path / "out"), "--timestamps",
                       "--confidence", str(manifest), str(broken))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = read_jsonl(tmp_path / "out" / "transcripts.json")
    assert [line["audio_filepath"] for line in lines] == [e["audio_filepath"] for e in entries]
    assert all(line["text"] == e["text"] and line["client_id"] == e["client_id"] for line, e in zip(lines, entries))
    for line in lines:
        assert len(line["word"]) == len(line["pred_text"].split()) == len(line["word_confidence"])
        assert all(0 <= w["start"] <= w["end"] <= line["duration"] + 0.05 for w in line["word"])
        assert all(0.0 <= c <= 1.0 for c in line["word_confidence"])
    (rejected,) = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert rejected["audio_filepath"] == str(broken) and rejected["reason"] == "decode_error"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["files"] == len(entries) and summary["rejected"] == 1 and summary["rtfx"] > 1
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
    log_probs = tr.CtcRunner.log_probs
    monkeypatch.setattr(tr.CtcRunner, "log_probs", lambda self, windows: seen.extend(map(len, windows))
                        or log_probs(self, windows))  # fmt: skip
    summary = tr.transcribe(str(tiny_model), [str(tmp_path / "long.flac")], str(tmp_path / "out"), timestamps=True)
    (line,) = read_jsonl(tmp_path / "out" / "transcripts.json")
    assert line["duration"] == 600.0 and line["pred_text"] and summary["files"] == 1
    assert len(seen) == 30 and max(seen) <= (tr.WINDOW_S + 2 * tr.CONTEXT_S) * 16000
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
    found = tr.collect_inputs([f"{s3_bucket}/in/clips/*_4000000[12].mp3", f"{s3_bucket}/in/list.jsonl",
                               f"{s3_bucket}/in/clips"])  # fmt: skip
    assert [f.uri for f in found] == [f"{s3_bucket}/in/clips/{c.name}" for c in clips]
    samples = tr.read_audio(found[0].uri, 16000)
    assert samples.dtype == np.float32 and 0.5 < len(samples) / 16000 < 20
    with pytest.raises(tr.HablaError, match="no audio file matches"):
        tr.collect_inputs([f"{s3_bucket}/in/*.flac"])
