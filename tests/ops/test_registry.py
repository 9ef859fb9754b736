"""habla.ops.registry: run records, the promotion verdict and models/best.json (local and on a real S3 server)."""

from __future__ import annotations

import json

import pytest

from habla.core import storage
from habla.core.errors import HablaError
from habla.core.layout import OutputLayout
from habla.ops import registry

NEW = {"wer": 0.20, "cer": 0.08, "utterances": 30, "hours": 0.05}


def finished_run(out: str, name: str, metrics: dict) -> str:
    """A run as the pipeline leaves it before promotion: run.json, a model and eval/metrics.json."""
    run = registry.start_run(out, name, "kfp-run-name", {"release": "cv-25", "release_uri": "s3://cv/25",
                                                        "config": "tiny", "config_overrides": ""})  # fmt: skip
    storage.write_bytes(run.train.model, b"model weights of " + name.encode())
    storage.write_text(run.eval.metrics, json.dumps(metrics))
    return run.root


def _scored(errors: list[int], words: int = 8, chars: int = 40) -> list[dict]:
    """Predictions-manifest lines: one utterance per error count (``chars`` characters, errors x 3 of them wrong)."""
    return [{"audio_filepath": f"/t/{i}.wav", "word_errors": e, "words": words, "char_errors": 3 * e, "chars": chars}
            for i, e in enumerate(errors)]  # fmt: skip


def test_the_verdict_and_its_markdown():
    first = registry.verdict(NEW, None, None, 0.0)
    assert first.promote and "becomes the best" in first.markdown and first.record["rule"] == "first model"
    best = {"run": "old"}
    # 200 utterances; the new model fixes 2 errors on 60 of them and breaks none: a real improvement.
    base = [i % 4 for i in range(200)]
    fixed = [max(0, e - 2) if i < 60 else e for i, e in enumerate(base)]
    better = registry.verdict(NEW, best, {"wer": 0.25, "cer": 0.1}, 0.01, _scored(fixed), _scored(base))
    assert better.promote and "best (old)" in better.markdown and "promoted" in better.markdown
    assert better.record["wer_improvement_ci"][0] > 0.01 and better.record["utterances"] == 200
    # The same improvement does not clear a margin larger than itself.
    wide = registry.verdict(NEW, best, {"wer": 0.25, "cer": 0.1}, 0.2, _scored(fixed), _scored(base))
    assert not wide.promote and "kept" in wide.markdown and "not above the margin 0.2" in wide.markdown
    with pytest.raises(HablaError, match="margin must be >= 0"):
        registry.verdict(NEW, best, {"wer": 0.3, "cer": 0.1}, -0.1, _scored(fixed), _scored(base))


def test_a_noise_level_improvement_is_refused():
    """The trial that prompted the rule: 9 test utterances, WER 1.000 -> 0.994 (one word fewer wrong) while the
    CER got much worse. A point comparison promoted it; the paired bootstrap does not."""
    best = _scored([8] * 9, words=8)
    new = _scored([8] * 8 + [7], words=8)
    for row in new:
        row["char_errors"] = 38  # CER 0.95 against the best model's 0.6
    decision = registry.verdict({"wer": 0.986, "cer": 0.95}, {"run": "old"}, {"wer": 1.0, "cer": 0.6}, 0.0, new, best)
    assert registry.beats(0.986, 1.0, 0.0)  # what the old rule did
    assert not decision.promote
    low, high = decision.record["wer_improvement_ci"]
    assert low <= 0 < high or decision.record["cer_improvement_ci"][1] < 0
    # A small, uniform improvement on few utterances is noise too: the interval reaches 0.
    noisy_best = _scored([1, 0, 2, 1, 3, 0, 1, 2, 0, 1])
    noisy_new = _scored([0, 1, 2, 1, 2, 0, 2, 1, 0, 1])
    noisy = registry.verdict(NEW, {"run": "old"}, {"wer": 0.14, "cer": 0.1}, 0.0, noisy_new, noisy_best)
    assert not noisy.promote and noisy.record["wer_improvement"] > 0 and noisy.record["wer_improvement_ci"][0] <= 0
    assert "may be noise" in noisy.markdown


def test_the_verdict_needs_the_same_test_set_and_is_recorded_in_run_json(tmp_path):
    best = _scored([1, 2, 3])
    with pytest.raises(HablaError, match="same test set"):
        registry.verdict(NEW, {"run": "old"}, {"wer": 0.3, "cer": 0.1}, 0.0, _scored([1, 2]), best)
    with pytest.raises(HablaError, match="per-utterance"):
        registry.verdict(NEW, {"run": "old"}, {"wer": 0.3, "cer": 0.1}, 0.0)
    run = finished_run(str(tmp_path), "r", NEW)
    decision = registry.verdict(NEW, {"run": "old"}, {"wer": 0.3, "cer": 0.1}, 0.0, _scored([0, 0, 1]), best)
    registry.record_decision(run, decision)
    record = json.loads(storage.read_text(OutputLayout(str(tmp_path)).run("r").record))
    assert record["promotion"]["promote"] == decision.promote and record["promotion"]["best_run"] == "old"
    assert record["config"] == "tiny" and record["promotion"]["decided"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_promotion_keeps_history_and_points_at_a_copied_model(where, tmp_path, request):
    out = str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3_bucket") + "/habla"
    assert registry.read_best(out) is None
    first = finished_run(out, "first try", NEW)
    run = json.loads(storage.read_text(OutputLayout(out).run("first try").record))
    assert run["run_name"] == "first try" and run["run_dir"] == storage.absolute(first) and run["started"]

    best = registry.promote_run(out, first, OutputLayout(out).run("first try").train.model)
    assert best["run"] == "first try" and best["metrics"] == NEW and best["history"] == []
    assert best["model"] == storage.absolute(OutputLayout(out).promoted_model("first try"))
    assert storage.read_bytes(best["model"]) == b"model weights of first try"

    second = finished_run(out, "second", {**NEW, "wer": 0.1})
    best = registry.promote_run(out, second, OutputLayout(out).run("second").train.model)
    assert registry.read_best(out) == best and best["run"] == "second"
    assert [h["run"] for h in best["history"]] == ["first try"] and "history" not in best["history"][0]


def test_a_run_without_a_name_is_named_after_the_kfp_run(tmp_path):
    run = registry.start_run(str(tmp_path), "", "habla-train-run-7", {})
    assert run.root == str(tmp_path / "runs" / "habla-train-run-7")
