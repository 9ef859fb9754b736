"""Where a pipeline run's outputs live, and the model registry (``models/best.json``).

Under the pipeline's output location ``OUT``::

    OUT/datasets/<release>-<fingerprint>/   prepared data, shared by every run with the same release and options
    OUT/runs/<run>/run.json                 the run's parameters (what users compare runs on)
    OUT/runs/<run>/model/                   habla train --out
    OUT/runs/<run>/eval/                    habla evaluate --out (eval/best/ for the current best model)
    OUT/models/<run>/model.nemo             promoted models
    OUT/models/best.json                    the current best model: run, release, config, metrics, history
"""

from __future__ import annotations

import json
import re
import time

from habla import commonvoice, storage
from habla.errors import HablaError


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80] or "run"


def run_dir(output_uri: str, run_name: str) -> str:
    return storage.join(output_uri, "runs", _slug(run_name))


def dataset_dir(output_uri: str, release_uri: str, fingerprint: str) -> str:
    return storage.join(output_uri, "datasets", f"{_slug(commonvoice.release_label(release_uri))}-{fingerprint}")


def write_run_record(run: str, params: dict) -> dict:
    """Write ``run.json``: the run's parameters plus when it started. Returns the record."""
    record = {**params, "run_dir": storage.absolute(run), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_text(storage.join(run, "run.json"), json.dumps(record, indent=1, ensure_ascii=False))
    return record


# ------------------------------------------------------------------------------------------- registry


def best_record_uri(output_uri: str) -> str:
    return storage.join(output_uri, "models", "best.json")


def read_best(output_uri: str) -> dict | None:
    """The current best model's record, or None when nothing has been promoted yet."""
    try:
        return json.loads(storage.read_text(best_record_uri(output_uri)))
    except FileNotFoundError:
        return None


def beats(new_wer: float, best_wer: float | None, margin: float) -> bool:
    """True when the new model should replace the best one: better by more than ``margin`` (absolute WER)."""
    if margin < 0:
        raise HablaError(f"the promotion margin must be >= 0, got {margin}")
    return best_wer is None or new_wer < best_wer - margin


def promote(output_uri: str, model_uri: str, run_name: str, record: dict) -> dict:
    """Copy the model under ``models/<run>/`` and make it the best in ``models/best.json``.

    ``record`` carries what users want to see about the model (release, config, metrics). The previous
    best is kept in the record's ``history``. The model is copied first: best.json never points at a
    model that is not there.
    """
    target = storage.join(output_uri, "models", _slug(run_name), "model.nemo")
    storage.copy(model_uri, target)
    previous = read_best(output_uri)
    history = (previous or {}).get("history", [])
    if previous:
        history = [{k: v for k, v in previous.items() if k != "history"}, *history][:20]
    best = {
        **record,
        "run": run_name,
        "model": storage.absolute(target),
        "promoted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "history": history,
    }
    storage.write_text(best_record_uri(output_uri), json.dumps(best, indent=1, ensure_ascii=False))
    return best


# ------------------------------------------------------------------------------------------- training


def dataset_report(dataset_uri: str) -> dict:
    try:
        return json.loads(storage.read_text(storage.join(dataset_uri, "report.json")))
    except FileNotFoundError:
        raise HablaError(f"{dataset_uri}: not a prepared dataset (no report.json)") from None


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
    import shlex

    report = dataset_report(dataset_uri)
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
    summary = json.loads(storage.read_text(storage.join(model_dir, "train_summary.json")))
    keys = ("steps", "epochs", "wall_seconds", "audio_hours_seen", "final_train_loss", "val_wer", "world_size")
    return {
        k: summary[k] for k in keys if isinstance(summary.get(k), (int, float)) and not isinstance(summary[k], bool)
    }
