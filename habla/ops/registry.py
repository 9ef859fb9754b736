"""Run records and the model registry: ``runs/<run>/run.json``, ``models/best.json`` and the promotion verdict.

A run records its parameters when it starts (:func:`start_run`). After evaluation, the new model is compared
with the current best one on the same test set (:func:`verdict`); a model that wins is copied under
``models/<run>/`` and recorded in ``models/best.json`` (:func:`promote_run`), whose ``history`` keeps the
models it replaced.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from habla.core import layout, render, storage
from habla.core.errors import HablaError
from habla.core.layout import OutputLayout, RunLayout

#: Metrics copied into the registry record.
RECORD_METRICS = ("wer", "cer", "utterances", "hours")
HISTORY_KEPT = 20


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def start_run(output_uri: str, name: str, job_name: str, params: dict) -> RunLayout:
    """Write ``run.json`` (the run's parameters and when it started); returns the run's folder.

    ``name`` is the pipeline's ``run_name`` parameter, ``job_name`` the KFP run's name (the folder's name
    when ``name`` is empty).
    """
    run_name = layout.run_name(name, job_name)
    run = OutputLayout(output_uri).run(run_name)
    record = {**params, "run_name": run_name, "run_dir": storage.absolute(run.root), "started": _now()}
    storage.write_text(run.record, json.dumps(record, indent=1, ensure_ascii=False))
    return run


def read_best(output_uri: str) -> dict | None:
    """The current best model's record, or None when nothing has been promoted yet."""
    try:
        return json.loads(storage.read_text(OutputLayout(output_uri).best))
    except FileNotFoundError:
        return None


def beats(new_wer: float, best_wer: float | None, margin: float) -> bool:
    """True when the new model should replace the best one: better by more than ``margin`` (absolute WER).

    The point comparison only; :func:`verdict` decides promotions with a paired bootstrap.
    """
    if margin < 0:
        raise HablaError(f"the promotion margin must be >= 0, got {margin}")
    return best_wer is None or new_wer < best_wer - margin


@dataclass(frozen=True)
class Verdict:
    """Whether the new model replaces the best one, the Markdown that explains it (for the KFP UI) and the
    numbers behind it (for run.json)."""

    promote: bool
    markdown: str
    record: dict = field(default_factory=dict)


def _paired_counts(new_rows: list[dict], best_rows: list[dict]) -> tuple[list, list]:
    """Both models' per-utterance rows in the same order; HablaError unless they cover the same utterances."""
    best_by_clip = {r["audio_filepath"]: r for r in best_rows}
    new_clips = [r["audio_filepath"] for r in new_rows]
    duplicates = len(best_by_clip) != len(best_rows) or len(set(new_clips)) != len(new_clips)
    if duplicates or set(new_clips) != set(best_by_clip):
        raise HablaError(
            f"the new model ({len(new_rows)} utterances) and the best one ({len(best_rows)}) were not scored on the "
            "same test set: they cannot be compared"
        )
    return new_rows, [best_by_clip[c] for c in new_clips]


def verdict(
    new: dict,
    best_record: dict | None,
    best_metrics: dict | None,
    margin: float,
    new_rows: list[dict] | None = None,
    best_rows: list[dict] | None = None,
) -> Verdict:
    """Decide whether the new model replaces the best one, both scored on the same test set.

    The rule (a paired bootstrap over utterances, habla.evaluation.scoring.paired_improvement):

    * the WER improvement (best WER - new WER) must exceed ``margin`` with 95 % confidence: the lower end of
      its 95 % interval is above ``margin`` (so the interval excludes 0 too);
    * and the CER must not be significantly worse: the upper end of the CER improvement's interval is >= 0.

    A difference the interval cannot tell from noise keeps the best model. ``new_rows``/``best_rows`` are
    the predictions manifests' lines (``word_errors``, ``words``, ``char_errors``, ``chars`` per utterance).
    """
    from habla.evaluation.scoring import CONFIDENCE, paired_improvement

    if margin < 0:
        raise HablaError(f"the promotion margin must be >= 0, got {margin}")
    if best_record is None or best_metrics is None:
        record = {
            "promote": True,
            "rule": "first model",
            "reason": "no model had been promoted yet",
            "wer": new["wer"],
            "cer": new["cer"],
        }
        return Verdict(True, "No model has been promoted yet: this one becomes the best.\n", record)
    if new_rows is None or best_rows is None:
        raise HablaError("the promotion verdict needs both models' per-utterance scores (predictions manifests)")
    new_rows, best_rows = _paired_counts(list(new_rows), list(best_rows))
    words = [r["words"] for r in new_rows]
    wer = paired_improvement([r["word_errors"] for r in new_rows], [r["word_errors"] for r in best_rows], words)
    cer = paired_improvement(
        [r["char_errors"] for r in new_rows], [r["char_errors"] for r in best_rows], [r["chars"] for r in new_rows]
    )
    wer_clear = wer["interval"][0] > margin
    cer_worse = cer["interval"][1] < 0
    promote = wer_clear and not cer_worse
    pct = f"{round(CONFIDENCE * 100)} %"
    if promote:
        why = f"its WER is lower by more than the margin {margin} with {pct} confidence"
    elif cer_worse:
        why = f"its CER is significantly worse ({pct} interval of the CER improvement below 0)"
    else:
        why = f"its WER improvement is not above the margin {margin} with {pct} confidence (it may be noise)"
    record = {
        "promote": promote,
        "rule": f"paired bootstrap over utterances: lower end of the {pct} interval of the WER improvement > margin, "
        "and CER not significantly worse",
        "margin": margin,
        "best_run": best_record.get("run"),
        "best_model": best_record.get("model"),
        "wer": new["wer"],
        "cer": new["cer"],
        "best_wer": best_metrics["wer"],
        "best_cer": best_metrics["cer"],
        "wer_improvement": wer["improvement"],
        "wer_improvement_ci": wer["interval"],
        "cer_improvement": cer["improvement"],
        "cer_improvement_ci": cer["interval"],
        "utterances": wer["utterances"],
        "reason": why,
    }
    rows = [
        {"model": "this run", "WER": new["wer"], "CER": new["cer"]},
        {"model": f"best ({best_record.get('run', '?')})", "WER": best_metrics["wer"], "CER": best_metrics["cer"]},
    ]
    lo, hi = wer["interval"]
    clo, chi = cer["interval"]
    outcome = "promoted: it replaces the best model" if promote else "kept: the best model stays"
    text = (
        "## Against the current best model\n\n"
        + render.table(rows)
        + f"\n\nOn the same {wer['utterances']} utterances, the new model's WER is lower by "
        f"{wer['improvement']:.4f} ({pct} interval {lo:.4f} to {hi:.4f}) and its CER by {cer['improvement']:.4f} "
        f"({clo:.4f} to {chi:.4f}), paired bootstrap over utterances.\n\n"
        f"Margin {margin}: **{outcome}** — {why}.\n"
    )
    return Verdict(promote, text, record)


def record_decision(run_dir: str, decision: Verdict) -> None:
    """Add the promotion decision and its numbers to the run's ``run.json`` (key ``promotion``)."""
    run = RunLayout(run_dir)
    params = json.loads(storage.read_text(run.record))
    params["promotion"] = {**decision.record, "decided": _now()}
    storage.write_text(run.record, json.dumps(params, indent=1, ensure_ascii=False))


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
