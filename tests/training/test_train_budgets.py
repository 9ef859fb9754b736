"""Every shipped config trains on both data paths (WAV files; tar shards through Lhotse) with a step budget and
with an epoch budget: its real data path, batch logic and schedule, at a size a CPU trains in seconds.

What each run pins: it ends at the step count habla.training.budget planned from the data (also for epochs
over a length-less Lhotse stream, which used to crash inside NeMo), the LR schedule ends within the run (the
last LR is the config's min_lr), the accumulation follows the global batch, and a GPU config falls back to
fp32 on this CPU.
"""

from __future__ import annotations

import json
import math

import pytest
from fixtures.commands import run_habla
from fixtures.releases import MINI_V8

from habla.core import jsonl
from habla.data.options import PrepareOptions
from habla.data.prepare import prepare
from habla.training import budget
from habla.training import config as train_config
from habla.training.train import train

pytestmark = pytest.mark.slow

# Only what makes the GPU configs fit a CPU: a smaller network and per-device batch, a global batch scaled
# down with it (so accumulation is still derived: 8 / 4 = 2), no loader worker processes.
CPU = ["model.train_ds.num_workers=0", "model.validation_ds.num_workers=0", "model.train_ds.batch_size=4",
       "model.validation_ds.batch_size=8", "global_batch=8"]  # fmt: skip
SHRINK = {
    "tiny_ctc_char": [],
    # QuartzNet's prologue, one residual block (of the 15) and its 1x1 epilogue, narrower; time masks of 5
    # frames: batches of these prompts can be shorter than the config's 55-frame masks
    "quartznet15x5_char": [*CPU, "model.spec_augment.time_width=5", "model.decoder.feat_in=128",
                           "model.encoder.jasper=["
                           + ", ".join(f"{{filters: {f}, repeat: {r}, kernel: [{k}], stride: [{s}], dilation: [1], "
                                       f"dropout: 0.0, residual: {str(res).lower()}, separable: {str(sep).lower()}}}"
                                       for f, r, k, s, res, sep in ((64, 1, 33, 2, False, True),
                                                                    (64, 2, 33, 1, True, True),
                                                                    (128, 1, 1, 1, False, False))) + "]"],
    "fastconformer_ctc_bpe": [*CPU, "model.encoder.n_layers=1", "model.encoder.d_model=32", "model.encoder.n_heads=2",
                              "model.encoder.subsampling_conv_channels=16", "model.tokenizer.vocab_size=40"],
}  # fmt: skip
BUDGETS = {"steps": ["trainer.max_steps=3", "trainer.max_epochs=-1"],
           "epochs": ["trainer.max_steps=-1", "trainer.max_epochs=2"]}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The bundled CV 8.0-layout release, prepared as WAV files and as tar shards (dev tarred too)."""
    root = tmp_path_factory.mktemp("budgets")
    wav = prepare(str(MINI_V8), str(root / "wav"), PrepareOptions(shards=1), workers=2)
    tar = prepare(str(MINI_V8), str(root / "tar"), PrepareOptions(shards=2, format="tar"), workers=2)
    return {
        "wav": {"train_manifest": wav["manifests"]["train"], "val": wav["manifests"]["dev"], "tars": None,
                "val_tars": None},
        "tar": {"train_manifest": tar["tarred"]["train"]["manifest_filepath"], "val": tar["manifests"]["dev"],
                "tars": tar["tarred"]["train"]["tarred_audio_filepaths"],
                "val_tars": tar["tarred"]["dev"]["tarred_audio_filepaths"]},
        "entries": jsonl.loads((root / "wav" / "manifests" / "train.json").read_text()),
    }  # fmt: skip


@pytest.mark.parametrize("mode", BUDGETS)
@pytest.mark.parametrize("path", ["wav", "tar"])
@pytest.mark.parametrize("config", SHRINK)
def test_config_trains_on_its_data_path_to_its_budget(config, path, mode, data, tmp_path, cache, one_thread):
    overrides = [*SHRINK[config], *BUDGETS[mode]]
    source = data[path]
    summary = train(config, source["train_manifest"], source["val"], str(tmp_path / "model"), overrides,
                    train_tars=source["tars"], val_tars=source["val_tars"])  # fmt: skip

    cfg = train_config.load(config, overrides)
    planned = budget.plan(cfg, data["entries"], 1, streamed=path == "tar")
    schedule, batch = summary["schedule"], summary["batch"]
    measured = batch.pop("measured_global_batch")
    assert schedule == planned.as_summary()["schedule"] and batch == planned.as_summary()["batch"]
    assert measured == pytest.approx(summary["utterances_seen"] / summary["steps"], abs=0.01)
    if path == "wav":  # NeMo's classic loader: whole batches, an epoch's last one partial
        assert 0 < measured <= batch["global_batch"]
    assert summary["steps"] == schedule["max_steps"] > 0
    if mode == "epochs":
        assert schedule["budget_from"] == "max_epochs" and summary["steps"] == 2 * schedule["steps_per_epoch"]
    else:
        assert schedule["budget_from"] == "max_steps" and summary["steps"] == 3
    assert batch["accumulate_grad_batches"] == math.ceil(batch["tuned_global_batch"] / batch["per_device_batch"])
    assert (batch["batch_duration"] is not None) == (path == "tar")  # Lhotse batches by duration
    # the schedule ran out within the run: cosine annealing ends at min_lr on the last step
    assert summary["final_lr"] == pytest.approx(cfg.model.optim.sched.min_lr, abs=1e-9)
    assert summary["precision"] == "32" and summary["val_wer"] is not None
    assert (tmp_path / "model" / "model.nemo").is_file()


def test_the_issue_command_trains_by_epochs_on_tar_shards_and_exits(data, tmp_path, cache):
    """The command of the report: ``habla train`` on ``habla prepare --format tar`` output of mini-es-v8 with
    ``trainer.max_epochs=1 trainer.max_steps=-1`` crashed inside fit (``len()`` of a Lhotse stream); with
    Lhotse's bucketing thread it would then never have exited."""
    tar = data["tar"]
    result = run_habla("train", "--config", "tiny_ctc_char", "--train-manifest", tar["train_manifest"],
                       "--train-tars", tar["tars"], "--val-manifest", tar["val"], "--val-tars", tar["val_tars"],
                       "--out", str(tmp_path / "model"),
                       "trainer.max_epochs=1", "trainer.max_steps=-1", env={"HABLA_CACHE": str(cache)},
                       timeout=300)  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    summary = json.loads((tmp_path / "model" / "train_summary.json").read_text())
    assert summary["schedule"]["budget_from"] == "max_epochs" and summary["steps"] == summary["schedule"]["max_steps"]
    assert "schedule: " in result.stderr and "(from trainer.max_epochs) = 1 epoch(s)" in result.stderr


def test_validation_comes_every_validate_every_steps_optimizer_steps(data, tmp_path, cache, one_thread, caplog):
    """Two batches per optimizer step: validate_every_steps=2 validates after steps 2 and 4 (every 4 batches,
    counted across epochs) inside fit, and the final weights (step 6) once after it."""
    import logging
    import re

    caplog.set_level(logging.INFO, logger="habla.train")
    source = data["wav"]
    summary = train("tiny_ctc_char", source["train_manifest"], source["val"], str(tmp_path / "model"),
                    ["model.train_ds.batch_size=4", "trainer.max_steps=6", "validate_every_steps=2"])  # fmt: skip
    validated = [int(m[1]) for r in caplog.records if (m := re.match(r"validation at step (\d+):", r.getMessage()))]
    assert summary["batch"]["accumulate_grad_batches"] == 2 and validated == [2, 4] and summary["val_wer"] is not None
    assert summary["cadence"] == {"validate_every_steps": 2, "checkpoint_every_steps": 2, "validations": 3}
