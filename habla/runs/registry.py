"""The model registry: ``models/best.json`` names the current best model; a model that beats it is copied under
``models/<run>/`` and recorded there (:func:`promote_run`), whose ``history`` keeps the models it replaced.

``best.json`` is only ever replaced by a compare-and-swap on the version that was read (habla.core.claims.swap:
S3 ``If-Match`` on its ETag, locally a rename under a lock file). Two runs that finish together cannot lose a
promotion: the loser re-reads, compares again on its own test set against the model that just won, and either
promotes or records why not in ``runs/<run>/eval/promotion.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from habla.core import claims, conditional, jsonl, state, storage
from habla.core.errors import HablaError
from habla.core.layout import EvalLayout, OutputLayout, RunLayout
from habla.evaluation.verdict import Verdict, verdict
from habla.runs.record import now, read_record

#: Metrics copied into the registry record.
RECORD_METRICS = ("wer", "cer", "utterances", "hours")
HISTORY_KEPT = 20
#: What a best.json record must hold to be compared against.
BEST_FIELDS = {"run": str, "model": str}


def read_best(output_uri: str) -> dict | None:
    """The current best model's record, or None when nothing has been promoted yet (HablaError if corrupt)."""
    return state.read(OutputLayout(output_uri).best, BEST_FIELDS, remedy=_CORRUPT_BEST)


_CORRUPT_BEST = "restore it from the history of its last good version, or delete it to promote the next model afresh"


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
    probe = conditional.probe_conditional_writes(output_uri)
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
    lands between the read and the write, the write is refused and the swap reads and asks again. The model
    is copied before best.json names it: best.json never points at a model that is not there.
    """
    layout = OutputLayout(output_uri)
    target = layout.package(run_name).model
    require_compare_and_swap(output_uri)
    outcome: list[Promotion] = []  # set when the swap leaves best.json as it is
    copied = False

    def change(previous: dict | None) -> dict | None:
        nonlocal copied
        if previous and previous.get("run") == run_name:
            outcome.append(Promotion(True, previous, "already the best model (an earlier attempt promoted it)"))
            return None
        why_not = still_better(previous) if still_better else None
        if why_not:
            # Nothing names this run's package (model copy, card, ONNX): best.json was never pointed at it.
            for leftover in list(storage.list_files(layout.package(run_name).root)):
                storage.delete(leftover.uri)
            outcome.append(Promotion(False, previous, why_not))
            return None
        if not copied:
            storage.copy(model_uri, target)
            copied = True
        best = {**record, "run": run_name, "model": storage.absolute(target), "promoted": now()}
        best["history"] = _history(previous)
        return best

    best = claims.swap(layout.best, change, BEST_FIELDS, remedy=_CORRUPT_BEST)
    return outcome[0] if best is None else Promotion(True, best)


#: Re-decides a promotion against a best model, given where that model was scored on this run's test set.
Decide = Callable[[dict, EvalLayout], Verdict]


def scores(where: EvalLayout) -> tuple[dict, list[dict]]:
    """An evaluation's metrics and per-utterance predictions."""
    metrics = state.load(where.metrics, ("wer", "cer"), what="evaluation")
    return metrics, jsonl.loads(storage.read_text(where.predictions))


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
    by habla.runs.record.record_comparison). If best.json names another model now — a run that finished
    meanwhile, or one that wins the compare-and-swap race — this run compares again, on its own test set, before
    replacing it: ``score_best(model_uri)`` scores that model on the run's test set when given (it needs the
    model's runtime) and returns the evaluation folder; otherwise the winner's own evaluation is used when it
    was measured on the same test set. ``decide(best_record, best_evaluation)`` makes the call (default:
    habla.evaluation.verdict.verdict, the paired bootstrap, with the run's ``promotion_margin``). When no
    comparison on the same test set is possible, the best model stays and the reason is recorded. The outcome
    is written to ``eval/promotion.json``.
    """
    run = RunLayout(run_dir)
    params = read_record(run_dir)
    metrics, _ = scores(run.eval)
    note = state.read(run.eval.promotion) or {}
    test_set = note.get("test_set", "")
    compared = note.get("compared_with") if "compared_with" in note else "unknown"
    margin = float(params.get("promotion_margin") or 0.0)
    if decide is None:

        def decide(best: dict, best_evaluation: EvalLayout) -> Verdict:
            best_metrics, best_rows = scores(best_evaluation)
            new_rows = scores(run.eval)[1]
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
        shown = f"WER {numbers['wer']:.4f} against {numbers['best_wer']:.4f}, " if "best_wer" in numbers else ""
        why = numbers.get("reason") or "it does not beat it"
        return (
            f"re-compared on this run's test set with {best.get('run')}, promoted meanwhile: {shown}margin "
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
        "recorded": now(),
    }
    state.write(run.eval.promotion, outcome_note)
    return outcome
