"""The whole pipeline, run on this machine through kfp.local on the bundled release (slow: trains twice)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from fixtures.commands import read_jsonl, run_habla
from fixtures.releases import MINI

pytestmark = pytest.mark.slow

# Short training: the test checks the plumbing end to end; learning itself is checked in test_train.py.
STEPS = "trainer.max_steps=60"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    first = run_habla("pipeline", "run-local", "--out", str(out), "--run-name", "first", STEPS, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # The same release again with a margin nobody can beat: the data is reused, the model not promoted.
    second = run_habla(
        "pipeline",
        "run-local",
        "--out",
        str(out),
        "--run-name",
        "second run",  # a name with a space: its folder is runs/second-run, the same for every step
        STEPS,
        "promotion_margin=0.99",  # the largest margin the parameters take (below 1)
        "config_overrides=model.optim.lr=0.01",
        timeout=900,
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return out, first, second


def test_data_outputs_account_for_every_row(two_runs):
    out, _, _ = two_runs
    (dataset,) = (out / "datasets").iterdir()  # both runs share one prepared dataset
    rejected = read_jsonl(dataset / "rejected.jsonl")
    for split in ("train", "dev", "test"):
        rows = len((MINI / f"{split}.tsv").read_text().splitlines()) - 1
        kept = read_jsonl(dataset / "manifests" / f"{split}.json")
        assert len(kept) + sum(r["split"] == split for r in rejected) == rows
        assert all(Path(e["audio_filepath"]).is_file() for e in kept)
    assert (dataset / "report.md").read_text().startswith("# Dataset report")


def test_model_metrics_and_the_wer_table(two_runs):
    out, first, _ = two_runs
    run = out / "runs" / "first"
    assert (run / "model" / "model.nemo").stat().st_size > 100_000
    summary = json.loads((run / "model" / "train_summary.json").read_text())
    assert summary["steps"] == 60
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    test_clips = len(read_jsonl(next((out / "datasets").iterdir()) / "manifests" / "test.json"))
    assert metrics["utterances"] == test_clips and 0.0 <= metrics["wer"] and 0.0 <= metrics["cer"] <= 1.5
    assert sum(g["utterances"] for g in metrics["by_gender"].values()) == test_clips
    assert f"WER {metrics['wer']:.4f} (" in first.stdout  # the summary printed at the end, with its interval
    record = json.loads((run / "run.json").read_text())
    assert record["config"] == "tiny_ctc_char" and record["launcher"] == "local"


def test_promotion_record(two_runs):
    out, _, _ = two_runs
    best = json.loads((out / "models" / "best.json").read_text())
    assert best["run"] == "first"  # the first model is promoted; the second cannot beat it by 0.99 WER
    assert Path(best["model"]).is_file() and best["model"].startswith(str(out / "models" / "first"))
    assert best["metrics"]["wer"] == json.loads((out / "runs" / "first" / "eval" / "metrics.json").read_text())["wer"]
    # the second run evaluated the best model on the same test set, and kept it
    assert (out / "runs" / "second-run" / "eval" / "best" / "metrics.json").exists()
    assert not (out / "models" / "second-run").exists()


def test_compare_the_two_runs(two_runs):
    out, _, _ = two_runs
    result = run_habla("compare", str(out / "runs" / "first"), str(out / "runs" / "second-run"), "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert sorted(r["run"] for r in rows) == ["first", "second run"]
    wers = [r["wer"] for r in rows]
    assert wers == sorted(wers)
    assert Counter(r["config"] for r in rows) == {"tiny_ctc_char": 2}


def test_the_console_fits_on_a_screen_and_the_logs_hold_the_rest(two_runs):
    """One line per step, then the summary: WER/CER with intervals, the verdict, every report's path. KFP's
    executor input, its warnings and NeMo's logs are in the step log files, not on the console."""
    out, first, second = two_runs
    console = first.stdout.splitlines() + first.stderr.splitlines()
    assert len(console) <= 40, "\n".join(console)
    assert "executor_input" not in first.stdout + first.stderr and "[NeMo" not in first.stdout + first.stderr
    for step in ("start-run", "plan-dataset", "train-here", "evaluate-models", "package-model", "promote-model"):
        assert any(line.startswith(f"✓ {step} ") for line in console), step
        assert (out / "runs" / "first" / "logs" / f"{step}.log").stat().st_size > 0
    logs = (out / "runs" / "first" / "logs" / "pipeline.log").read_text()
    assert "Got executor_input" in logs and "[NeMo" in logs  # silenced on the console, kept in the files
    assert "promoted: the first model of this output folder" in first.stdout
    # the report in the run folder carries the verdict, not only the KFP UI's copy
    assert "this output folder had no promoted model yet" in (out / "runs" / "first" / "eval" / "report.md").read_text()
    assert "**kept: the best model stays**" in (out / "runs" / "second-run" / "eval" / "report.md").read_text()
    assert json.loads((out / "runs" / "first" / "run.json").read_text())["state"] == "succeeded"
    assert "not promoted:" in second.stdout and "WER improvement over first" in second.stdout
    for report in ("evaluation report", "model card", "ONNX export", "dataset report", "step logs"):
        assert report in first.stdout, report
    promotion = json.loads((out / "runs" / "second-run" / "run.json").read_text())["promotion"]
    assert promotion["promote"] is False and promotion["best_run"] == "first" and promotion["margin"] == 0.99
    package = out / "models" / "first"
    assert json.loads((package / "onnx_check.json").read_text())["verified"] and (package / "README.md").is_file()


def test_a_failed_step_fails_the_run_in_one_line(tmp_path):
    """A corrupt models/best.json crashed evaluate-models with a traceback, and run-local exited 0."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "best.json").write_text('{"run": "old", "model": ')
    result = run_habla("pipeline", "run-local", "--out", str(tmp_path), "--run-name", "r", "trainer.max_steps=5",
                       timeout=900)  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("habla pipeline: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "the pipeline failed at step evaluate-models" in errors[0] and "best.json: corrupt" in errors[0]
    assert "✗ evaluate-models" in result.stdout
