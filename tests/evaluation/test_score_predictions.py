"""`habla evaluate --predictions`: transcripts made elsewhere (Whisper, a Hugging Face model) scored as habla scores
its own: the same normalisation, intervals, breakdowns and files; bad input in one line."""

from __future__ import annotations

import json

from fixtures.commands import read_jsonl, run_habla, write_manifest

REFERENCES = [
    {"audio_filepath": f"/clips/{i}.wav", "duration": 2.0, "text": text, "gender": gender, "client_id": f"s{i % 3}"}
    for i, (text, gender) in enumerate(
        [("qué tal estás", "female_feminine"), ("el perro come", "male_masculine"), ("hola mundo", "female_feminine"),
         ("buenos días", "male_masculine")] * 5
    )
]  # fmt: skip
# What another system wrote: punctuation, capitals, odd spaces (habla's normalisation removes them), one error.
OUTSIDE = {
    "qué tal estás": "¿Qué  tal estás? ",
    "el perro come": "El perro comió.",
    "hola mundo": "¡Hola, mundo!",
    "buenos días": "Buenos días",
}


def test_outside_transcripts_are_scored_with_habla_normalisation(tmp_path):
    predictions = [{"audio_filepath": r["audio_filepath"], "pred_text": OUTSIDE[r["text"]]} for r in REFERENCES]
    refs = write_manifest(REFERENCES, tmp_path / "test.json")
    preds = write_manifest(list(reversed(predictions)), tmp_path / "whisper.json")  # any order: joined by audio
    result = run_habla("evaluate", "--predictions", str(preds), "--manifest", str(refs), "--out", str(tmp_path / "e"))
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout.splitlines()[-1])
    words = sum(len(r["text"].split()) for r in REFERENCES)
    assert printed["wer"] == round(5 / words, 6) or abs(printed["wer"] - 5 / words) < 1e-9  # only "comió" is wrong
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["wer_ci"][0] <= metrics["wer"] <= metrics["wer_ci"][1]
    assert metrics["by_gender"]["female_feminine"]["wer"] == 0.0 and metrics["by_gender"]["male_masculine"]["wer"] > 0
    assert metrics["confusions"]["words"][0] == {"ref": "come", "hyp": "comió", "count": 5}
    rows = read_jsonl(tmp_path / "e" / "predictions.json")
    assert [r["audio_filepath"] for r in rows] == [r["audio_filepath"] for r in REFERENCES]
    assert rows[0]["pred_text"] == "qué tal estás"  # normalised as habla's references are
    assert (tmp_path / "e" / "report.md").read_text().startswith("# Evaluation")
    # one manifest holding both sides (text and pred_text) needs no --manifest
    both = write_manifest([{**r, "pred_text": OUTSIDE[r["text"]]} for r in REFERENCES], tmp_path / "both.json")
    alone = run_habla("evaluate", "--predictions", str(both), "--out", str(tmp_path / "f"))
    assert alone.returncode == 0 and json.loads(alone.stdout.splitlines()[-1])["wer"] == printed["wer"]


def test_bad_predictions_are_one_line(tmp_path):
    refs = write_manifest(REFERENCES, tmp_path / "test.json")
    partial = write_manifest([{"audio_filepath": "/clips/0.wav", "pred_text": "hola"}], tmp_path / "partial.json")
    cases = [
        (["--predictions", str(partial), "--manifest", str(refs)], "no prediction for 19 of the 20 utterances"),
        (["--predictions", str(partial)], "no text (the reference)"),
        (["--predictions", str(refs)], "no pred_text"),
        (["--manifest", str(refs)], "give --model"),
    ]
    for args, message in cases:
        result = run_habla("evaluate", *args, "--out", str(tmp_path / "x"))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], (args, result.stderr)
