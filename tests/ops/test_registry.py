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


def test_the_verdict_and_its_markdown():
    first = registry.verdict(NEW, None, None, 0.0)
    assert first.promote and "becomes the best" in first.markdown
    best = {"run": "old"}
    better = registry.verdict(NEW, best, {"wer": 0.25, "cer": 0.1}, margin=0.01)
    assert better.promote and "best (old)" in better.markdown and "promoted" in better.markdown
    within_margin = registry.verdict(NEW, best, {"wer": 0.205, "cer": 0.1}, margin=0.01)
    assert not within_margin.promote and "kept" in within_margin.markdown
    with pytest.raises(HablaError, match="margin must be >= 0"):
        registry.verdict(NEW, best, {"wer": 0.3, "cer": 0.1}, margin=-0.1)


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


def test_a_run_without_a_name_is_named_after_the_kfp_run_id(tmp_path):
    run = registry.start_run(str(tmp_path), "", "3f2a9c1e-run-id", {})
    assert run.root == str(tmp_path / "runs" / "3f2a9c1e-run-id")
    assert json.loads(storage.read_text(run.record))["run_id"] == "3f2a9c1e-run-id"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_no_two_runs_share_a_run_folder(where, tmp_path, request):
    """A folder belongs to the run that created its run.json: a second run of the same name (a cloned KFP run,
    a reused --run-name) fails before it could resume from the first one's checkpoints; a retry of the same
    run (same run id) goes on in its own folder."""
    out = str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3_bucket") + "/habla"
    first = registry.start_run(out, "nightly es", "run-id-1", {"config": "tiny"})
    record = storage.read_text(first.record)
    assert registry.start_run(out, "nightly es", "run-id-1", {"config": "changed"}) == first  # a retried step
    assert storage.read_text(first.record) == record
    for name in ("nightly es", "nightly-es"):  # the same folder, whatever the spelling
        with pytest.raises(HablaError, match="belongs to another run \\(run-id-1\\)"):
            registry.start_run(out, name, "run-id-2", {"config": "tiny"})
    assert storage.read_text(first.record) == record
    with pytest.raises(HablaError, match="run id"):
        registry.start_run(out, "x", "", {})
