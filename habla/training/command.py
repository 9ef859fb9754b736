"""The ``habla train`` command line for a prepared dataset, and the numbers of a finished training run.

Light on purpose (no omegaconf, torch or NeMo): the pipeline's cluster launcher step calls it in the slim
image before it starts a TrainJob that runs the command.
"""

from __future__ import annotations

import json
import shlex

from habla.core import storage
from habla.core.errors import HablaError
from habla.core.layout import TrainLayout
from habla.data.report import read_report

#: train_summary.json numbers worth showing and comparing in the KFP UI.
SUMMARY_METRICS = ("steps", "epochs", "wall_seconds", "audio_hours_seen", "final_train_loss", "val_wer", "world_size")


def train_arguments(
    dataset_uri: str,
    model_dir: str,
    config: str,
    overrides: str = "",
    max_steps: int = 0,
    max_epochs: int = 0,
    init_from: str = "",
) -> list[str]:
    """The ``habla train`` arguments for a prepared dataset (tar shards when it has them).

    ``overrides`` is a space-separated list of dotted ``key=value`` config overrides; ``max_steps`` /
    ``max_epochs`` > 0 override the config's. ``--resume`` makes a retried step continue from its
    checkpoints instead of starting over.
    """
    report = read_report(dataset_uri)
    manifests = report["manifests"]
    for split in ("train", "dev"):
        if split not in manifests:
            raise HablaError(f"{dataset_uri}: prepared without the {split} split, which training needs")
    args = ["--config", config, "--out", storage.absolute(model_dir), "--val-manifest", manifests["dev"], "--resume"]
    tarred = report.get("tarred", {}).get("train")
    if tarred:
        args += ["--train-manifest", tarred["manifest_filepath"], "--train-tars", tarred["tarred_audio_filepaths"]]
    else:
        args += ["--train-manifest", manifests["train"]]
    if init_from:
        args += ["--init-from", init_from]
    extra = shlex.split(overrides)
    if max_steps > 0:
        extra.append(f"trainer.max_steps={max_steps}")
    if max_epochs > 0:
        extra.append(f"trainer.max_epochs={max_epochs}")
    return args + extra


def training_metrics(model_dir: str) -> dict[str, float]:
    """The numbers of ``train_summary.json`` worth showing and comparing in the KFP UI."""
    summary = json.loads(storage.read_text(TrainLayout(model_dir).summary))
    return {
        k: summary[k]
        for k in SUMMARY_METRICS
        if isinstance(summary.get(k), (int, float)) and not isinstance(summary[k], bool)
    }
