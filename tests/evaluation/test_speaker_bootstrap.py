"""Intervals and the paired promotion test resample speakers (``client_id``), not utterances: errors cluster by
speaker, and a test set's uncertainty is that of its few hundred voices."""

from __future__ import annotations

import pytest

from habla.core.errors import HablaError
from habla.evaluation.scoring import bootstrap_interval, compute_metrics, paired_improvement, speakers_of
from habla.evaluation.verdict import verdict


def _clustered_errors():
    """20 speakers × 10 utterances of 10 words; half the speakers are hard (5 errors an utterance), half easy (0)."""
    errors, words, speakers = [], [], []
    for s in range(20):
        for _ in range(10):
            errors.append(5 if s % 2 else 0)
            words.append(10)
            speakers.append(f"speaker{s}")
    return errors, words, speakers


def test_speaker_intervals_are_wider_than_utterance_intervals_when_errors_cluster():
    errors, words, speakers = _clustered_errors()
    by_utterance = bootstrap_interval(errors, words)
    by_speaker = bootstrap_interval(errors, words, clusters=speakers)
    assert by_speaker[0] <= 0.25 <= by_speaker[1]
    assert by_speaker[1] - by_speaker[0] > 2 * (by_utterance[1] - by_utterance[0])
    # one speaker per utterance is the utterance bootstrap exactly
    assert bootstrap_interval(errors, words, clusters=[str(i) for i in range(len(errors))]) == by_utterance


def test_metrics_record_the_unit_and_utterances_without_a_speaker_are_their_own():
    entries = [{"audio_filepath": f"/a/{i}.wav", "duration": 1.0, "text": "hola que tal", "client_id": f"s{i % 3}"}
               for i in range(9)] + [{"audio_filepath": "/a/x.wav", "duration": 1.0, "text": "hola"}]  # fmt: skip
    metrics, rows = compute_metrics(entries, ["hola que tal"] * 4 + ["hola"] * 6)
    assert metrics["bootstrap"]["unit"] == "speaker (client_id)" and metrics["bootstrap"]["speakers"] == 4
    assert speakers_of(rows)[-1].startswith("\0")  # the "unknown" group is not one speaker
    only = compute_metrics(entries[-1:], ["hola"])[0]
    assert only["bootstrap"]["unit"] == "utterance"


def test_a_gain_on_one_speaker_is_not_promoted():
    """The new model fixes every error of one talkative speaker: significant by utterances, not by speakers."""
    rows_new, rows_best = [], []
    for s in range(12):
        for u in range(30 if s == 0 else 3):
            base = {"audio_filepath": f"/t/{s}-{u}.wav", "words": 10, "chars": 50, "client_id": f"s{s}"}
            best_errors = 3 if s == 0 else (2 if u % 2 else 1)
            new_errors = 0 if s == 0 else (3 if u % 2 else 1)
            rows_best.append({**base, "word_errors": best_errors, "char_errors": best_errors})
            rows_new.append({**base, "word_errors": new_errors, "char_errors": new_errors})
    words = [r["words"] for r in rows_new]
    by_utterance = paired_improvement([r["word_errors"] for r in rows_new], [r["word_errors"] for r in rows_best],
                                      words)  # fmt: skip
    assert by_utterance["interval"][0] > 0  # the utterance bootstrap would promote
    v = verdict({"wer": 0.1, "cer": 0.1}, {"run": "old"}, {"wer": 0.2, "cer": 0.2}, 0.0, rows_new, rows_best)
    assert not v.promote and v.record["bootstrap_unit"] == "speaker (client_id)" and v.record["speakers"] == 12
    assert "over speaker (client_id) (12 resampled)" in v.markdown


def test_fine_tuning_gain_compares_baseline_and_fine_tuned_on_the_same_utterances():
    from habla.evaluation.verdict import fine_tuning_gain

    base, tuned = [], []
    for s in range(30):
        for u in range(4):
            row = {"audio_filepath": f"/t/{s}-{u}.wav", "words": 10, "chars": 50, "client_id": f"s{s}"}
            base.append({**row, "word_errors": 3, "char_errors": 6})
            tuned.append({**row, "word_errors": 1 + (s + u) % 2, "char_errors": 4})
    gain = fine_tuning_gain({"wer": 0.3, "cer": 0.12}, base, {"wer": 0.15, "cer": 0.08}, list(reversed(tuned)),
                            "stt_es_tiny")  # fmt: skip
    assert gain["wer_improvement"] == pytest.approx(0.15) and gain["wer_improvement_ci"][0] > 0
    assert gain["bootstrap_unit"] == "speaker (client_id)" and gain["speakers"] == 30
    assert "stt_es_tiny (zero-shot)" in gain["markdown"] and "fine-tuning lowered the WER" in gain["markdown"]
    with pytest.raises(HablaError, match="not scored on the same test set"):
        fine_tuning_gain({"wer": 0.3, "cer": 0.1}, base[:-1], {"wer": 0.1, "cer": 0.1}, tuned)


def test_the_report_shows_both_heads_and_the_overlap():
    from habla.evaluation.report import render_report

    entries = [{"audio_filepath": f"/a/{i}.wav", "duration": 1.0, "text": "hola que tal", "client_id": f"s{i}"}
               for i in range(4)]  # fmt: skip
    metrics, rows = compute_metrics(entries, ["hola que tal", "hola", "hola que tal", "que"])
    metrics.update(decoder="rnnt", heads={"rnnt": {"wer": 0.25, "cer": 0.1, "wer_ci": [0.1, 0.4], "cer_ci": [0, 1]},
                                          "ctc": {"wer": 0.5, "cer": 0.2, "wer_ci": [0.2, 0.7], "cer_ci": [0, 1]}},
                   overlap={"with": "cv12/train.tsv", "training_clips": 9, "clips": 1, "speakers": 1,
                            "utterances_of_seen_speakers": 1, "sentences": 0, "overlapping_utterances": 2,
                            "utterances_without": 2, "wer_without": 0.3333, "wer_without_ci": [0.0, 0.66]})  # fmt: skip
    text = render_report(metrics, rows, "m.nemo", "test.json", 2)
    assert "RNNT (reported)" in text and "| CTC " in text
    assert "2 utterance(s) overlap" in text and "WER 0.3333" in text


def test_the_wer_of_the_subset_the_training_filters_keep_is_reported_beside():
    entries = [{"audio_filepath": f"/a/{i}.wav", "duration": 1.0, "text": "hola que tal", "client_id": f"s{i}"}
               for i in range(4)]  # fmt: skip
    entries[3]["training_filter"] = "chars_per_second"
    metrics, _ = compute_metrics(entries, ["hola que tal", "hola que tal", "hola que tal", "nada"])
    assert metrics["utterances"] == 4 and metrics["wer"] == 0.25  # every test clip is scored
    subset = metrics["filtered_subset"]
    assert (
        subset["utterances"] == 3 and subset["wer"] == 0.0 and subset["excluded_by_filter"] == {"chars_per_second": 1}
    )
    assert "filtered_subset" not in compute_metrics(entries[:3], ["hola que tal"] * 3)[0]
