"""Run records and the model registry: ``runs/<run>/run.json``, ``models/best.json`` and the promotion verdict.

A run records its parameters when it starts (:func:`start_run`). After evaluation, the new model is compared
with the current best one on the same test set (:func:`verdict`); a model that wins is copied under
``models/<run>/`` and recorded in ``models/best.json`` (:func:`promote_run`), whose ``history`` keeps the
models it replaced.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from habla.core import layout, render, storage
from habla.core.errors import HablaError
from habla.core.layout import OutputLayout, RunLayout

#: Metrics copied into the registry record.
RECORD_METRICS = ("wer", "cer", "utterances", "hours")
HISTORY_KEPT = 20


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def start_run(output_uri: str, name: str, run_id: str, params: dict) -> RunLayout:
    """Claim the run's folder for the KFP run ``run_id`` and write ``run.json`` (parameters, run id, start time).

    ``name`` is the pipeline's ``run_name`` parameter; the folder is ``runs/<name>``, else ``runs/<run_id>``
    (layout.run_name). run.json is created only if absent: a folder that belongs to another run is refused
    (HablaError), so a run can never resume from another run's checkpoints; the same run again (a retried
    step) keeps its first record.
    """
    if not run_id:
        raise HablaError("start_run needs the KFP run id")
    run_name = layout.run_name(name, run_id)
    run = OutputLayout(output_uri).run(run_name)
    record = {
        **params,
        "run_name": run_name,
        "run_id": run_id,
        "run_dir": storage.absolute(run.root),
        "started": _now(),
    }
    if not storage.create_exclusive(run.record, json.dumps(record, indent=1, ensure_ascii=False).encode()):
        owner = json.loads(storage.read_text(run.record)).get("run_id")
        if owner != run_id:
            raise HablaError(
                f"{storage.absolute(run.root)} belongs to another run ({owner or 'one from before run ids'}): "
                "give this run another run_name"
            )
    return run


def read_best(output_uri: str) -> dict | None:
    """The current best model's record, or None when nothing has been promoted yet."""
    try:
        return json.loads(storage.read_text(OutputLayout(output_uri).best))
    except FileNotFoundError:
        return None


def beats(new_wer: float, best_wer: float | None, margin: float) -> bool:
    """True when the new model should replace the best one: better by more than ``margin`` (absolute WER)."""
    if margin < 0:
        raise HablaError(f"the promotion margin must be >= 0, got {margin}")
    return best_wer is None or new_wer < best_wer - margin


@dataclass(frozen=True)
class Verdict:
    """Whether the new model replaces the best one, and the Markdown that explains it (for the KFP UI)."""

    promote: bool
    markdown: str


def verdict(new: dict, best_record: dict | None, best_metrics: dict | None, margin: float) -> Verdict:
    """Compare the new model's metrics with the best model's, both measured on the same test set."""
    if best_record is None or best_metrics is None:
        return Verdict(True, "No model has been promoted yet: this one becomes the best.\n")
    promote = beats(new["wer"], best_metrics["wer"], margin)
    rows = [
        {"model": "this run", "WER": new["wer"], "CER": new["cer"]},
        {"model": f"best ({best_record.get('run', '?')})", "WER": best_metrics["wer"], "CER": best_metrics["cer"]},
    ]
    outcome = "promoted: it replaces the best model" if promote else "kept: the best model stays"
    text = (
        "## Against the current best model\n\n"
        + render.table(rows)
        + f"\n\nMargin {margin}: the new model is **{outcome}**.\n"
    )
    return Verdict(promote, text)


def promote(output_uri: str, model_uri: str, run_name: str, record: dict) -> dict:
    """Copy the model under ``models/<run>/`` and make it the best in ``models/best.json``.

    ``record`` carries what users want to see about the model (release, config, metrics). The previous
    best is kept in the record's ``history``. The model is copied first: best.json never points at a
    model that is not there.
    """
    layout = OutputLayout(output_uri)
    target = layout.promoted_model(run_name)
    storage.copy(model_uri, target)
    previous = read_best(output_uri)
    history = (previous or {}).get("history", [])
    if previous:
        history = [{k: v for k, v in previous.items() if k != "history"}, *history][:HISTORY_KEPT]
    best = {**record, "run": run_name, "model": storage.absolute(target), "promoted": _now(), "history": history}
    storage.write_text(layout.best, json.dumps(best, indent=1, ensure_ascii=False))
    return best


def promote_run(output_uri: str, run_dir: str, model_uri: str) -> dict:
    """Promote a run's model with the record users see: release, config, overrides and test metrics."""
    run = RunLayout(run_dir)
    params = json.loads(storage.read_text(run.record))
    metrics = json.loads(storage.read_text(run.eval.metrics))
    record = {
        "release": params["release"],
        "release_uri": params["release_uri"],
        "config": params["config"],
        "config_overrides": params["config_overrides"],
        "run_dir": params["run_dir"],
        "metrics": {k: metrics[k] for k in RECORD_METRICS},
    }
    return promote(output_uri, model_uri, params["run_name"], record)
