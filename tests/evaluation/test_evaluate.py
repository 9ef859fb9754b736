"""habla evaluate's scoring, tables and plot (no NeMo): corpus-level WER/CER, groups, normalization.

The end-to-end runs (a trained model transcribing real clips, local and from S3) are in test_train.py and
test_train_s3.py; the CLI's error path is here.
"""

from __future__ import annotations

import re

import pytest
from fixtures.commands import run_habla, write_manifest

from habla.core.errors import HablaError
from habla.evaluation.report import render_plot, render_report
from habla.evaluation.scoring import bootstrap_interval, compute_metrics, score, scoring_text


def entry(text: str, gender: str = "", age: str = "", accents: str = "", duration: float = 1.0) -> dict:
    return {"audio_filepath": f"/a/{text[:8]}.wav", "duration": duration, "text": text, "gender": gender, "age": age,
            "accents": accents}  # fmt: skip


def test_scoring_uses_the_training_normalization():
    assert scoring_text("¿Qué tal, Ñandú?") == "qué tal ñandú"
    assert scoring_text("  ") == ""
    assert scoring_text("Número 42") == "número 42"  # unsupported digits are kept (and count as errors)
    assert score("qué tal", "que tal").word_errors == 1
    assert score(scoring_text("¡Hola!"), scoring_text("hola")).word_errors == 0


def test_edit_counts_and_empty_references():
    s = score("hola que tal", "hola ke")
    assert (s.word_errors, s.words) == (2, 3) and s.wer == pytest.approx(2 / 3)
    assert (s.char_errors, s.chars) == (6, 12) and s.cer == 0.5  # q->k, u, " tal" deleted
    assert score("", "").wer == 0.0 and score("", "algo").wer == 1.0 and score("algo", "").wer == 1.0


def test_corpus_level_metrics_and_breakdowns():
    entries = [
        entry("uno dos tres", "female_feminine", "twenties", "México", 2.0),
        entry("cuatro", "male_masculine", "thirties", "", 1.0),
        entry("cinco seis", "female_feminine", "", "México", 1.6),
    ]
    metrics, rows = compute_metrics(entries, ["uno dos tres", "cuatro cinco", "seis"])
    # word errors: 0 + 1 (insertion) + 1 (deletion) over 3 + 1 + 2 words
    assert metrics["wer"] == pytest.approx(2 / 6) and metrics["utterances"] == 3
    assert metrics["hours"] == pytest.approx(4.6 / 3600, abs=1e-6)
    assert list(metrics)[:4] == ["wer", "cer", "utterances", "hours"]
    assert (metrics["substitutions"], metrics["deletions"], metrics["insertions"], metrics["words"]) == (0, 1, 1, 6)
    female = metrics["by_gender"]["female_feminine"]
    assert female["wer"] == pytest.approx(1 / 5, abs=1e-6) and female["utterances"] == 2
    assert female["wer_ci"][0] <= female["wer"] <= female["wer_ci"][1]
    assert metrics["by_gender"]["male_masculine"]["wer"] == 1.0
    assert metrics["by_age"]["unknown"]["utterances"] == 1  # an empty value is the group "unknown"
    assert metrics["by_accent"] == {
        "México": metrics["by_accent"]["México"],
        "unknown": metrics["by_accent"]["unknown"],
    }
    assert [r["wer"] for r in rows] == [0.0, 1.0, 0.5] and rows[1]["gender"] == "male_masculine"
    assert rows[1]["text"] == "cuatro" and rows[1]["pred_text"] == "cuatro cinco"  # NeMo's manifest keys

    report = render_report(metrics, rows, "m.nemo", "test.json", worst=5)
    assert "## WER by gender" in report and re.search(r"\| female_feminine +\| 2 +\|", report)
    assert "Worst utterances (2 of 2 with errors)" in report
    assert re.search(r"\| 1\.0000 +\| 1 +\| cuatro +\| cuatro cinco +\|", report)
    assert render_plot(metrics, "runs/x/model/model.nemo", "datasets/y/manifests/test.json")[:4] == b"\x89PNG"


def test_accent_column_of_older_releases():
    old = {"audio_filepath": "/a.wav", "duration": 1.0, "text": "hola", "accent": "andino"}
    metrics, _ = compute_metrics([old], ["hola"])
    assert list(metrics["by_accent"]) == ["andino"] and list(metrics["by_gender"]) == ["unknown"]


def test_evaluate_cli_missing_audio_and_missing_model_are_one_line(tmp_path, train_clips):
    manifest = write_manifest([{**train_clips[0], "audio_filepath": str(tmp_path / "x.wav")}], tmp_path / "t.json")
    result = run_habla("evaluate", "--model", str(tmp_path / "m.nemo"), "--manifest", str(manifest),
                       "--out", str(tmp_path / "eval"))  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "habla evaluate: error:" in result.stderr and "x.wav: no such file" in result.stderr

    good = write_manifest(train_clips[:1], tmp_path / "good.json")
    result = run_habla(
        "evaluate", "--model", str(tmp_path / "m.nemo"), "--manifest", str(good), "--out", str(tmp_path / "e")
    )
    assert result.returncode == 2 and "--model" in result.stderr and "no such file" in result.stderr
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_confusions_name_the_spanish_errors_people_look_for():
    entries = [entry("la calle y ella está aquí"), entry("ella se llama lucía")]
    metrics, _ = compute_metrics(entries, ["la caye i eya esta aqui", "eya se yama lucia"])
    chars = {(c["ref"], c["hyp"]): c["count"] for c in metrics["confusions"]["characters"]}
    words = {(c["ref"], c["hyp"]): c["count"] for c in metrics["confusions"]["words"]}
    assert chars[("ll", "y")] == 4 and chars[("á", "a")] == 1 and chars[("í", "i")] == 2  # a run, not l→y + l→∅
    assert words[("ella", "eya")] == 2 and words[("calle", "caye")] == 1
    assert metrics["confusions"]["characters"][0] == {"ref": "ll", "hyp": "y", "count": 4}  # most frequent first


def test_bootstrap_intervals_contain_the_estimate_and_narrow_with_more_utterances():
    errors = [0, 1, 0, 2, 1, 0, 0, 3, 1, 0] * 3
    words = [5, 4, 6, 5, 5, 7, 3, 6, 4, 5] * 3
    small = bootstrap_interval(errors[:10], words[:10])
    large = bootstrap_interval(errors * 20, words * 20)
    rate = sum(errors) / sum(words)
    assert small[0] <= rate <= small[1] and large[0] <= rate <= large[1]
    assert large[1] - large[0] < (small[1] - small[0]) / 3
    assert bootstrap_interval(errors, words) == bootstrap_interval(errors, words)  # seeded: reproducible


def test_per_speaker_wer_is_keyed_by_client_id():
    entries = [{**entry("uno dos"), "client_id": "a" * 64}, {**entry("tres"), "client_id": "b" * 64},
               {**entry("cuatro"), "client_id": "a" * 64}]  # fmt: skip
    metrics, rows = compute_metrics(entries, ["uno dos", "", "cinco"])
    assert metrics["by_speaker"]["a" * 64]["wer"] == pytest.approx(1 / 3, abs=1e-6)
    assert metrics["by_speaker"]["b" * 64] == {**metrics["by_speaker"]["b" * 64], "wer": 1.0, "utterances": 1}
    assert rows[1]["client_id"] == "b" * 64
    assert "## WER by speaker (2 of 2 speakers" in render_report(metrics, rows, "m", "t", worst=3)


def test_a_test_set_without_reference_words_has_no_wer():
    """evaluate reported WER 0.0 on a test set with zero reference words."""
    entries = [{"audio_filepath": f"/a/{k}.wav", "duration": 1.0, "text": text} for k, text in enumerate(["", "¿?"])]
    with pytest.raises(HablaError, match="none of the 2 references holds a word once normalized: WER and CER are"):
        compute_metrics(entries, ["hola", ""])


def test_reports_show_data_as_text_never_markup():
    """<script> and <img onerror> from TSV fields reached report.md unescaped; '$' broke the plot."""
    hostile = "<img src=x onerror=alert(1)> [x](javascript:alert(1)) $\\frac{a}{b}$ | `code`"
    entries = [{"audio_filepath": "/a/1.wav", "duration": 1.0, "text": "uno dos", "accents": hostile,
                "gender": "$x$", "path": "<script>.mp3"}]  # fmt: skip
    metrics, rows = compute_metrics(entries, ["uno tres"])
    report = render_report(metrics, rows, "model`with`ticks.nemo", "<b>test</b>.json", worst=5)
    assert "<img" not in report and "<script>" not in report
    assert "`<b>test</b>.json`" in report  # paths are code spans: shown as written, never rendered
    assert "](javascript" not in report and "&lt;img src=x onerror=alert(1)&gt;" in report
    assert "``model`with`ticks.nemo``" in report
    assert render_plot(metrics, "m", "t")[:4] == b"\x89PNG"
