"""Training from the NeMo tar shards ``habla prepare --format tar`` wrote to a loopback S3 server (moto),
with every output in S3, a resume that pulls its checkpoint back from S3, and an evaluation of an S3 model
on an S3 manifest."""

from __future__ import annotations

import json

import pytest
from fixtures.releases import MINI_V8

from habla.core import jsonl, storage
from habla.data.options import PrepareOptions
from habla.data.prepare import prepare
from habla.evaluation.evaluate import evaluate
from habla.training.train import train

pytestmark = pytest.mark.slow


@pytest.fixture
def tarred_in_s3(s3_bucket) -> dict:
    """The bundled CV 8.0-layout release prepared into S3: train as 2 tar shards, dev as one tar per shard."""
    report = prepare(str(MINI_V8), f"{s3_bucket}/data", PrepareOptions(shards=2, format="tar"), workers=2)
    train_entries = jsonl.loads(storage.read_text(f"{s3_bucket}/data/manifests/train.json"))
    return {**report["tarred"]["train"], "val": report["manifests"]["dev"], "train": train_entries,
            "val_tars": report["tarred"]["dev"]["tarred_audio_filepaths"]}  # fmt: skip


def test_train_from_tar_shards_in_s3_and_resume_from_s3(s3_bucket, tarred_in_s3, cache, one_thread):
    manifest_pattern, tar_pattern = tarred_in_s3["manifest_filepath"], tarred_in_s3["tarred_audio_filepaths"]
    clips, val_manifest, val_tars = tarred_in_s3["train"], tarred_in_s3["val"], tarred_in_s3["val_tars"]
    assert tarred_in_s3["num_shards"] == 2 and tar_pattern.startswith("s3://")
    dst = f"{s3_bucket}/run/model"
    overrides = ["trainer.max_steps=12", "model.train_ds.batch_size=4", "checkpoint.every_n_train_steps=6"]

    summary = train("tiny_ctc_char", manifest_pattern, val_manifest, dst, overrides, train_tars=tar_pattern,
                    val_tars=val_tars)  # fmt: skip
    assert summary["steps"] == 12 and summary["resumed_from_step"] == 0
    # a device holds 4 clips of the longest duration, more of the usual ones: tiny_ctc_char's global batch of 8
    batch = summary["batch"]
    assert batch["global_batch"] == pytest.approx(8) and batch["device_capacity"] == pytest.approx(
        4 * max(c["duration"] for c in clips), abs=0.01)  # fmt: skip
    mean = sum(c["duration"] for c in clips) / len(clips)
    assert summary["audio_hours_seen"] * 3600 == pytest.approx(12 * 8 * mean, rel=0.5)
    names = {info.uri[len(dst) + 1 :] for info in storage.list_files(dst)}
    assert {"model.nemo", "train_summary.json", "config.yaml", "checkpoints/last.ckpt"} <= names
    assert any(n.startswith("logs/") and "tfevents" in n for n in names)
    assert json.loads(storage.read_text(f"{dst}/train_summary.json"))["steps"] == 12
    # the dev tars were read once into the cache (their members); the train shards were streamed
    assert list((cache / "tarred").rglob("*.wav")) and not list(cache.rglob("*.tar"))

    # The local working copy is gone (a new pod): --resume pulls last.ckpt back from S3 and goes on.
    import shutil

    shutil.rmtree(cache / "runs")
    more = train("tiny_ctc_char", manifest_pattern, val_manifest, dst, [*overrides, "trainer.max_steps=18"],
                 resume=True, train_tars=tar_pattern, val_tars=val_tars)  # fmt: skip
    assert more["resumed_from_step"] == 12 and more["steps"] == 18
    assert more["audio_hours_seen"] > summary["audio_hours_seen"]

    metrics = evaluate(f"{dst}/model.nemo", val_manifest, f"{s3_bucket}/run/eval", batch_size=4, tars=val_tars)
    assert metrics["utterances"] == len(storage.read_text(val_manifest).splitlines())
    names = {info.uri.rsplit("/", 1)[-1] for info in storage.list_files(f"{s3_bucket}/run/eval")}
    assert names == {"metrics.json", "predictions.json", "report.md", "wer_by_group.png", "evaluate.log"}
    predictions = storage.read_text(f"{s3_bucket}/run/eval/predictions.json").splitlines()
    first = json.loads(predictions[0])  # reported as the manifest names it (a tar member), not by the cache
    assert (first["audio_filepath"], first["shard_id"]) in {(e["audio_filepath"], e["shard_id"]) for e in
                                                            jsonl.loads(storage.read_text(val_manifest))}  # fmt: skip


def test_missing_tar_shard_is_one_clear_error(s3_bucket, tarred_in_s3, cache):
    from habla.core.errors import HablaError

    manifest_pattern, tar_pattern, val = (
        tarred_in_s3[k] for k in ("manifest_filepath", "tarred_audio_filepaths", "val")
    )
    tarred = f"{s3_bucket}/data/tarred/train"
    storage.delete(f"{tarred}/audio_1.tar")
    with pytest.raises(HablaError, match="audio_1.tar: tar shard not found"):
        train("tiny_ctc_char", manifest_pattern, val, f"{s3_bucket}/out", train_tars=tar_pattern)
    # a shard whose members are not what its manifest lists (a path prefix, say)
    storage.write_text(f"{tarred}/manifest_0.json", storage.read_text(f"{tarred}/manifest_0.json").replace(
        '"audio_filepath": "', '"audio_filepath": "clips/'))  # fmt: skip
    storage.copy(f"{tarred}/audio_0.tar", f"{tarred}/audio_1.tar")
    with pytest.raises(HablaError, match="audio_0.tar: member .* is not in"):
        train("tiny_ctc_char", manifest_pattern, val, f"{s3_bucket}/out", train_tars=tar_pattern)
