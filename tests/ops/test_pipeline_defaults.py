"""The compiled pipeline's own defaults train: tar shards streamed through Lhotse, fastconformer_ctc_bpe, its
budget and global batch (max_steps=0 and max_epochs=0 keep the config's), on the bundled release through
kfp.local. Only what this CPU machine needs is changed: the training runs here (launcher=local), for two
epochs, with the FastConformer shrunk and no loader worker processes. This is the run that crashed inside
NeMo's fit (``len()`` of a Lhotse stream) before the budget was derived from the data."""

from __future__ import annotations

import json

import pytest
from fixtures.commands import run_habla

pytestmark = pytest.mark.slow

CPU_ONLY = [
    "launcher=local",  # no cluster here to start a TrainJob on
    "train_cpu=1", "train_memory=4Gi",  # the pipeline's own pod is sized before it runs: "auto" is for cluster jobs
    "max_epochs=2",  # two epochs, not the config's 100,000 steps
    "model.encoder.n_layers=1", "model.encoder.d_model=32", "model.encoder.n_heads=2",
    "model.encoder.subsampling_conv_channels=16", "model.tokenizer.vocab_size=40",  # ~100 sentences of text
    "model.train_ds.num_workers=0", "model.validation_ds.num_workers=0",
]  # fmt: skip


def test_the_pipeline_defaults_train_on_tar_shards_by_epochs(tmp_path):
    out = tmp_path / "out"
    result = run_habla("pipeline", "run-local", "--pipeline-defaults", "--out", str(out), "--run-name", "defaults",
                       *CPU_ONLY, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    run = out / "runs" / "defaults"
    record = json.loads((run / "run.json").read_text())
    assert (record["format"], record["config"], record["max_steps"], record["num_shards"]) == (
        "tar", "fastconformer_ctc_bpe", 0, 32)  # fmt: skip
    (dataset,) = (out / "datasets").iterdir()
    report = json.loads((dataset / "report.json").read_text())
    assert report["tarred"]["train"]["num_shards"] >= 2 and report["options"]["format"] == "tar"

    summary = json.loads((run / "model" / "train_summary.json").read_text())
    schedule, batch = summary["schedule"], summary["batch"]
    assert schedule["budget_from"] == "max_epochs" and summary["steps"] == schedule["max_steps"] == 2 * schedule[
        "steps_per_epoch"]  # fmt: skip
    # the config's global batch, one process: 2048 / 128 per device = accumulate 16; duration batches (Lhotse)
    assert (batch["tuned_global_batch"], batch["accumulate_grad_batches"]) == (2048, 16) and batch["batch_duration"]
    assert summary["precision"] == "32"  # bf16-mixed falls back on a CPU
    assert summary["final_lr"] == pytest.approx(1e-4)  # the cosine schedule ran out within the two epochs
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["utterances"] > 0 and 0.0 <= metrics["cer"]
