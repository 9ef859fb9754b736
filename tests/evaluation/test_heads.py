"""Both heads of a hybrid RNNT/CTC model, transducers, ``--decoder``, and ``--overlap-with`` the checkpoint's
training data: real NeMo checkpoints of the published classes (tests/fixtures/checkpoints.py) on real clips."""

from __future__ import annotations

import json

import pytest
from fixtures.commands import read_jsonl, run_habla, write_manifest

from habla.evaluation.evaluate import evaluate, transcribe

pytestmark = pytest.mark.slow


def _nemo_transcripts(checkpoint, paths, decoder_type=None) -> list[str]:
    """NeMo's own ``model.transcribe`` (the reference habla's runners must match)."""
    from nemo.collections.asr.models import ASRModel

    model = ASRModel.restore_from(str(checkpoint), map_location="cpu")
    if decoder_type:
        model.change_decoding_strategy(decoder_type=decoder_type, verbose=False)
    out = model.transcribe(list(paths), batch_size=4, verbose=False)
    out = out[0] if isinstance(out, tuple) else out
    return [" ".join((h.text if hasattr(h, "text") else h).split()) for h in out]


@pytest.fixture(scope="module")
def ten_clips(clips30, tmp_path_factory):
    entries = read_jsonl(clips30)[:10]
    return write_manifest(entries, tmp_path_factory.mktemp("ten") / "ten.json"), entries


def test_a_hybrid_is_scored_with_both_heads_and_reports_its_rnnt_head(hybrid_checkpoint, ten_clips, tmp_path,
                                                                      one_thread):  # fmt: skip
    manifest, entries = ten_clips
    paths = [e["audio_filepath"] for e in entries]
    rnnt, timing = transcribe(str(hybrid_checkpoint), paths, 4)
    assert timing["decoder"] == "rnnt"
    assert rnnt == _nemo_transcripts(hybrid_checkpoint, paths)  # NeMo's default head: RNNT
    ctc, _ = transcribe(str(hybrid_checkpoint), paths, 4, decoder="ctc")
    assert ctc == _nemo_transcripts(hybrid_checkpoint, paths, "ctc")
    assert any(rnnt) and any(ctc) and rnnt != ctc

    metrics = evaluate(str(hybrid_checkpoint), str(manifest), str(tmp_path / "eval"), batch_size=4)
    assert metrics["decoder"] == metrics["default_decoder"] == "rnnt"
    assert set(metrics["heads"]) == {"rnnt", "ctc"}
    assert metrics["heads"]["rnnt"]["wer"] == metrics["wer"]
    assert [r["pred_text"] for r in read_jsonl(tmp_path / "eval" / "predictions.json")] == _normalized(rnnt)
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk["heads"]["ctc"]["wer"] == metrics["heads"]["ctc"]["wer"]


def _normalized(texts):
    from habla.evaluation.scoring import scoring_text

    return [scoring_text(t) for t in texts]


def test_the_cli_takes_the_decoder_and_refuses_a_head_the_model_lacks(
    transducer_checkpoint, ctc_bpe_checkpoint, hybrid_checkpoint, ten_clips, tmp_path
):
    manifest, _ = ten_clips
    result = run_habla("evaluate", "--model", str(transducer_checkpoint), "--manifest", str(manifest), "--out",
                       str(tmp_path / "rnnt"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["decoder"] == "rnnt" and set(printed["heads"]) == {"rnnt"}
    result = run_habla("evaluate", "--model", str(hybrid_checkpoint), "--manifest", str(manifest), "--out",
                       str(tmp_path / "ctc"), "--decoder", "ctc")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["decoder"] == "ctc" and printed["heads"]["ctc"]["wer"] == printed["wer"]
    for model, decoder in ((transducer_checkpoint, "ctc"), (ctc_bpe_checkpoint, "rnnt")):
        result = run_habla("evaluate", "--model", str(model), "--manifest", str(manifest), "--out",
                           str(tmp_path / "bad"), "--decoder", decoder)  # fmt: skip
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"--decoder {decoder}: a " in result.stderr and f"has no {decoder.upper()} head" in result.stderr
    result = run_habla("transcribe", "--model", str(hybrid_checkpoint), "--out", str(tmp_path / "tr"),
                       "--decoder", "ctc", str(manifest))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "tr" / "summary.json").read_text())["decoder"] == "ctc"


def test_overlap_with_the_checkpoints_training_data(ctc_bpe_checkpoint, ten_clips, tmp_path, one_thread):
    """Test clips, speakers and sentences found in the checkpoint's train.tsv, and the WER without them."""
    manifest, entries = ten_clips
    tsv = tmp_path / "train.tsv"
    header = "client_id\tpath\tsentence\tup_votes\n"
    rows = [f"other\t{entries[0]['path']}\tNada que ver.\t2",  # a test clip
            f"{entries[1]['client_id']}\tcommon_voice_es_x.mp3\tOtra frase distinta.\t2",  # a test speaker
            f"someone\tcommon_voice_es_y.mp3\t{entries[2]['sentence']}\t2"]  # a test sentence, as written  # fmt: skip
    tsv.write_text(header + "\n".join(rows) + "\n", encoding="utf-8")
    metrics = evaluate(str(ctc_bpe_checkpoint), str(manifest), str(tmp_path / "eval"), batch_size=4,
                       overlap_with=str(tsv))  # fmt: skip
    o = metrics["overlap"]
    speaker_1 = sum(e["client_id"] == entries[1]["client_id"] for e in entries)
    sentence_2 = sum(e["text"] == entries[2]["text"] for e in entries)
    assert o["clips"] == sum(e["path"] == entries[0]["path"] for e in entries) >= 1
    assert o["speakers"] >= 1 and o["utterances_of_seen_speakers"] >= speaker_1 >= 1
    assert o["sentences"] == sentence_2 >= 1
    clean = [r for r in read_jsonl(tmp_path / "eval" / "predictions.json")
             if r["path"] != entries[0]["path"] and r["client_id"] != entries[1]["client_id"]
             and r["text"] != entries[2]["text"]]  # fmt: skip
    assert o["utterances_without"] == len(clean) == 10 - o["overlapping_utterances"]
    assert o["wer_without"] == pytest.approx(sum(r["word_errors"] for r in clean) / sum(r["words"] for r in clean))

    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n1\t2\n")
    result = run_habla("evaluate", "--model", str(ctc_bpe_checkpoint), "--manifest", str(manifest), "--out",
                       str(tmp_path / "x"), "--overlap-with", str(bad))  # fmt: skip
    assert result.returncode == 2 and "--overlap-with" in result.stderr and "'path' column" in result.stderr


def test_the_pipelines_evaluation_shows_what_fine_tuning_bought(ctc_bpe_checkpoint, ten_clips, tmp_path, monkeypatch,
                                                                 one_thread):  # fmt: skip
    """With init_from, the checkpoint is scored zero-shot on the same test set: baseline -> fine-tuned in the
    metrics, the Markdown and the KFP metrics (here the "fine-tuned" model is the checkpoint itself: gain 0)."""
    from habla.core.layout import RunLayout
    from habla.runs.evaluate import evaluate_run

    manifest, _ = ten_clips
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "report.json").write_text(json.dumps({"manifests": {"test": str(manifest)}}))
    run_dir = tmp_path / "out" / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"run_name": "r1"}))
    store = tmp_path / "store"
    store.mkdir()
    (store / "stt_es_tiny.nemo").write_bytes(ctc_bpe_checkpoint.read_bytes())
    monkeypatch.setenv("HABLA_MODEL_STORE", str(store))
    tsv = tmp_path / "cv12-train.tsv"
    tsv.write_text(f"client_id\tpath\tsentence\nx\t{read_jsonl(manifest)[0]['path']}\tuna frase\n")
    result = evaluate_run(str(run_dir), str(dataset), str(ctc_bpe_checkpoint), str(tmp_path / "out"), 0.0,
                          init_from="stt_es_tiny", overlap_with=str(tsv))  # fmt: skip
    assert result.metrics["overlap"]["clips"] == 1
    baseline_metrics = json.loads((run_dir / "eval" / "baseline" / "metrics.json").read_text())
    assert baseline_metrics["overlap"]["clips"] == 1
    gain = result.gain
    assert gain["baseline"]["wer"] == result.metrics["wer"] and gain["wer_improvement"] == 0.0
    assert gain["bootstrap_unit"] == "speaker (client_id)"
    assert "What fine-tuning bought" in result.report and "stt_es_tiny (zero-shot)" in result.report
    assert result.ui_metrics()["baseline_wer"] == result.metrics["wer"]
    on_disk = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert on_disk["fine_tuning_gain"]["wer_improvement"] == 0.0
    assert RunLayout(str(run_dir)).baseline_eval.root.endswith("eval/baseline")
    assert (run_dir / "eval" / "baseline" / "predictions.json").is_file()


def test_the_pipelines_evaluation_reads_a_tarred_test_split_as_it_reads_wav_files(ctc_bpe_checkpoint, ten_clips,
                                                                                   tmp_path, one_thread):  # fmt: skip
    """A dataset prepared with --format tar lists its test clips as members of tar shards (report.json names
    them): the pipeline's evaluation reads them out of the tars and scores what the same WAV files score."""
    import tarfile
    from pathlib import Path

    from habla.runs.evaluate import evaluate_run

    manifest, entries = ten_clips
    dataset = tmp_path / "dataset"
    (dataset / "tarred").mkdir(parents=True)
    tarred = []
    for k in range(2):
        with tarfile.open(dataset / "tarred" / f"audio_{k}.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            for e in entries[5 * k : 5 * (k + 1)]:
                tar.add(e["audio_filepath"], arcname=Path(e["audio_filepath"]).name)
                tarred.append({**e, "audio_filepath": Path(e["audio_filepath"]).name, "shard_id": k})
    write_manifest(tarred, dataset / "test.json")
    tars = {"tarred_audio_filepaths": str(dataset / "tarred" / "audio__OP_0..1_CL_.tar")}
    report = {"manifests": {"test": str(dataset / "test.json")}, "tarred": {"test": tars}}
    (dataset / "report.json").write_text(json.dumps(report))
    run_dir = tmp_path / "out" / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"run_name": "r1"}))
    result = evaluate_run(str(run_dir), str(dataset), str(ctc_bpe_checkpoint), str(tmp_path / "out"), 0.0)
    as_wav = evaluate(str(ctc_bpe_checkpoint), str(manifest), str(tmp_path / "wav"))
    assert result.metrics["utterances"] == 10 and result.metrics["wer"] == as_wav["wer"]
    rows = read_jsonl(run_dir / "eval" / "predictions.json")
    assert [r["pred_text"] for r in rows] == [r["pred_text"] for r in read_jsonl(tmp_path / "wav" / "predictions.json")]
    assert [(r["audio_filepath"], r["shard_id"]) for r in rows] == [(e["audio_filepath"], k // 5) for k, e in
                                                                    enumerate(tarred)]  # fmt: skip
    without_tars = run_habla("evaluate", "--model", str(ctc_bpe_checkpoint), "--manifest", str(dataset / "test.json"),
                             "--out", str(tmp_path / "x"))  # fmt: skip
    assert without_tars.returncode == 2 and "give the tar shards too" in without_tars.stderr
    assert "Traceback" not in without_tars.stderr
