"""Run records and the model registry: ``runs/<run>/run.json``, ``models/best.json`` and the promotion verdict.

A run records its parameters when it starts (:func:`start_run`). After evaluation, the new model is compared
with the current best one on the same test set (:func:`verdict`) and the comparison is noted in the run
(:func:`record_comparison`); a model that wins is copied under ``models/<run>/`` and recorded in
``models/best.json`` (:func:`promote_run`), whose ``history`` keeps the models it replaced.

``best.json`` is only ever replaced by a compare-and-swap on the version that was read (S3: ``If-Match`` on its
ETag; local: a rename under a lock file). Two runs that finish together cannot lose a promotion: the loser
re-reads, compares again on its own test set against the model that just won, and either promotes or records
why not in ``runs/<run>/eval/promotion.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from habla.core import jsonl, layout, render, storage
from habla.core.errors import HablaError
from habla.core.layout import EvalLayout, OutputLayout, RunLayout

log = logging.getLogger(__name__)

#: Metrics copied into the registry record.
RECORD_METRICS = ("wer", "cer", "utterances", "hours")
HISTORY_KEPT = 20
CAS_ATTEMPTS = 20  # compare-and-swap rounds before giving up (each lost round means another run promoted)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def start_run(output_uri: str, name: str, run_id: str, params: dict) -> RunLayout:
    """Claim the run's folder for the KFP run ``run_id`` and write ``run.json`` (parameters, run id, start time).

    ``name`` is the pipeline's ``run_name`` parameter; the folder is ``runs/<name>``, else ``runs/<run_id>``
    (layout.run_name). run.json is created only if absent, then read back: a folder that belongs to another run
    is refused (HablaError), so a run can never resume from another run's checkpoints; the same run again (a
    retried step) keeps its first record.
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
    if not storage.exists(run.record):
        data = json.dumps(record, indent=1, ensure_ascii=False).encode()
        try:  # atomic where the store enforces conditional writes (docs/operations.md)
            storage.create_exclusive(run.record, data)
        except Exception:  # noqa: BLE001 - a store that refuses the condition (501): write; the read decides
            storage.write_bytes(run.record, data)
    owner = json.loads(storage.read_text(run.record)).get("run_id")  # read back: a store may ignore the condition
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


def record_comparison(run_dir: str, best: dict | None, test_set: str, decision: Verdict) -> None:
    """Note in the run which best model its evaluation compared against, on which test set, and the outcome:
    the promotion step re-compares if the best model changed in between."""
    note = {
        "compared_with": {"run": best.get("run"), "model": best.get("model")} if best else None,
        "test_set": test_set,
        "verdict": "promote" if decision.promote else "keep",
        "decided": _now(),
    }
    storage.write_text(RunLayout(run_dir).eval.promotion, json.dumps(note, indent=1, ensure_ascii=False))


@dataclass(frozen=True)
class Promotion:
    """The outcome of a promotion: whether this run's model is now the best, the best record, and why not."""

    promoted: bool
    best: dict | None
    reason: str = ""


#: Decides whether a run still beats ``best`` (a best.json record) given that model's metrics on the run's test
#: set; None when it cannot tell (see :func:`promote_run`).
StillBetter = Callable[[dict | None], str | None]


def _history(previous: dict | None) -> list:
    if not previous:
        return []
    return [{k: v for k, v in previous.items() if k != "history"}, *previous.get("history", [])][:HISTORY_KEPT]


def require_compare_and_swap(output_uri: str) -> None:
    """Refuse, in one line, to update best.json on a store that does not enforce If-Match (it would be a plain
    overwrite: a promotion could be lost without anyone noticing)."""
    probe = storage.probe_conditional_writes(output_uri)
    if not probe.compare_and_swap:
        raise HablaError(
            f"cannot update models/best.json safely: {probe.store} does not enforce If-Match ({probe.detail}); "
            "the model stays where it is; keep output_uri on a store that enforces conditional writes "
            "(docs/operations.md, 'Object stores')"
        )


def promote(
    output_uri: str, model_uri: str, run_name: str, record: dict, still_better: StillBetter | None = None
) -> Promotion:
    """Copy the model under ``models/<run>/`` and make it the best in ``models/best.json`` by compare-and-swap
    (a run that does not win leaves nothing under ``models/<run>/``: not the copy, not its card or ONNX).

    ``record`` carries what users want to see about the model (release, config, metrics). The previous best is
    kept in the record's ``history``. ``still_better(best)`` is asked before each write with the best record
    just read: a reason string keeps that best (nothing is written), None goes ahead. When another promotion
    lands between the read and the write, the write is refused and the loop reads and asks again. The model
    is copied before best.json names it: best.json never points at a model that is not there.
    """
    layout = OutputLayout(output_uri)
    target = layout.package(run_name).model
    require_compare_and_swap(output_uri)
    copied = False
    for _ in range(CAS_ATTEMPTS):
        current = storage.read_versioned(layout.best)
        previous = json.loads(current.data) if current else None
        if previous and previous.get("run") == run_name:
            return Promotion(True, previous, "already the best model (an earlier attempt promoted it)")
        why_not = still_better(previous) if still_better else None
        if why_not:
            # Nothing names this run's package (model copy, card, ONNX): best.json was never pointed at it.
            for leftover in list(storage.list_files(layout.package(run_name).root)):
                storage.delete(leftover.uri)
            return Promotion(False, previous, why_not)
        if not copied:
            storage.copy(model_uri, target)
            copied = True
        best = {**record, "run": run_name, "model": storage.absolute(target), "promoted": _now()}
        best["history"] = _history(previous)
        data = json.dumps(best, indent=1, ensure_ascii=False).encode("utf-8")
        if storage.write_if_match(layout.best, data, current.etag if current else None):
            return Promotion(True, best)
        log.info("models/best.json changed while %s was being promoted: reading it again", run_name)
    raise HablaError(f"models/best.json kept changing: {run_name} not promoted after {CAS_ATTEMPTS} attempts")


#: Re-decides a promotion against a best model, given where that model was scored on this run's test set.
Decide = Callable[[dict, EvalLayout], Verdict]


def _scores(where: EvalLayout) -> tuple[dict, list[dict]]:
    """An evaluation's metrics and per-utterance predictions."""
    return json.loads(storage.read_text(where.metrics)), jsonl.loads(storage.read_text(where.predictions))


def promote_run(
    output_uri: str,
    run_dir: str,
    model_uri: str,
    *,
    decide: Decide | None = None,
    score_best: Callable[[str], str] | None = None,
) -> Promotion:
    """Promote a run's model with the record users see: release, config, overrides, test set and metrics.

    The run's evaluation compared its model with the best one of that moment (``eval/promotion.json``, written
    by :func:`record_comparison`). If best.json names another model now — a run that finished meanwhile, or one
    that wins the compare-and-swap race — this run compares again, on its own test set, before replacing it:
    ``score_best(model_uri)`` scores that model on the run's test set when given (it needs the model's runtime)
    and returns the evaluation folder; otherwise the winner's own evaluation is used when it was measured on
    the same test set. ``decide(best_record, best_evaluation)`` makes the call (default: :func:`verdict`, the
    paired bootstrap, with the run's ``promotion_margin``). When no comparison on the same test set is
    possible, the best model stays and the reason is recorded. The outcome is written to
    ``eval/promotion.json``.
    """
    run = RunLayout(run_dir)
    params = json.loads(storage.read_text(run.record))
    metrics = json.loads(storage.read_text(run.eval.metrics))
    try:
        note = json.loads(storage.read_text(run.eval.promotion))
    except FileNotFoundError:
        note = {}
    test_set = note.get("test_set", "")
    compared = note.get("compared_with") if "compared_with" in note else "unknown"
    margin = float(params.get("promotion_margin") or 0.0)
    if decide is None:

        def decide(best: dict, best_evaluation: EvalLayout) -> Verdict:
            best_metrics, best_rows = _scores(best_evaluation)
            new_rows = jsonl.loads(storage.read_text(run.eval.predictions))
            return verdict(metrics, best, best_metrics, margin, new_rows, best_rows)

    def still_better(best: dict | None) -> str | None:
        nonlocal compared
        if best is None:
            return None
        if compared == "unknown":  # no note from the evaluation: it compared against the best of this moment
            compared = {"run": best.get("run"), "model": best.get("model")}
        if compared and compared.get("model") == best.get("model"):
            return None  # the evaluation's comparison stands
        if score_best is not None:
            best_evaluation = EvalLayout(score_best(best["model"]))
        elif test_set and best.get("test_set") == test_set and best.get("run_dir"):
            best_evaluation = RunLayout(best["run_dir"]).eval
        else:
            return (
                f"the best model changed to {best.get('run')} after this run's evaluation, and it was measured on "
                f"another test set ({best.get('test_set') or 'not recorded'}), so the two cannot be compared here; "
                f"{best.get('run')} stays the best (evaluate this run again to compare)"
            )
        outcome = decide(best, best_evaluation)
        if outcome.promote:
            compared = {"run": best.get("run"), "model": best.get("model")}
            return None
        numbers = outcome.record
        scores = f"WER {numbers['wer']:.4f} against {numbers['best_wer']:.4f}, " if "best_wer" in numbers else ""
        why = numbers.get("reason") or "it does not beat it"
        return (
            f"re-compared on this run's test set with {best.get('run')}, promoted meanwhile: {scores}margin "
            f"{margin}: {why}; {best.get('run')} stays the best"
        )

    record = {
        "release": params["release"],
        "release_uri": params["release_uri"],
        "config": params["config"],
        "config_overrides": params["config_overrides"],
        "run_dir": params["run_dir"],
        "test_set": test_set,
        "metrics": {k: metrics[k] for k in RECORD_METRICS},
    }
    outcome = promote(output_uri, model_uri, params["run_name"], record, still_better)
    outcome_note = {
        **note,
        "promoted": outcome.promoted,
        "reason": outcome.reason,
        "best": (outcome.best or {}).get("run"),
        "recorded": _now(),
    }
    storage.write_text(run.eval.promotion, json.dumps(outcome_note, indent=1, ensure_ascii=False))
    return outcome
