"""A run's record: ``runs/<run>/run.json`` (its parameters, run id and start; later its promotion decision) and
``runs/<run>/eval/promotion.json`` (which best model its evaluation was compared with)."""

from __future__ import annotations

import time

from habla.core import claims, layout, state, storage
from habla.core.errors import HablaError
from habla.core.layout import OutputLayout, RunLayout
from habla.evaluation.verdict import Verdict
from habla.runs.parameters import RunParameters


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def start_run(params: RunParameters, run_id: str) -> RunLayout:
    """Claim the run's folder for the KFP run ``run_id`` and write ``run.json`` (parameters, run id, start time).

    The folder is ``runs/<run_name>``, else ``runs/<run_id>`` (layout.run_name). run.json is created once
    (habla.core.claims.claim) and read back: a folder that belongs to another run is refused (HablaError), so a
    run can never resume from another run's checkpoints; the same run again (a retried step) keeps its first
    record.
    """
    if not run_id:
        raise HablaError("start_run needs the KFP run id")
    run_name = layout.run_name(params.run_name, run_id)
    run = OutputLayout(params.output_uri).run(run_name)
    record = {**params.record(), "run_name": run_name, "run_id": run_id, "run_dir": storage.absolute(run.root),
              "started": now()}  # fmt: skip
    held = claims.claim(run.record, record, ("run_id",), remedy="give this run another run_name")
    if not held.mine and held.holder.get("resume") is True:
        return _resume(run, held.holder, record)
    if not held.mine:
        owner = held.holder.get("run_id") or "one from before run ids"
        where = storage.absolute(run.root)
        raise HablaError(f"{where} belongs to another run ({owner}): give this run another run_name")
    return run


# A run's ``state`` in run.json: absent (or "started") while it runs; then one of these.
SUCCEEDED, FAILED, INTERRUPTED = "succeeded", "failed", "interrupted"
RESUMABLE = (FAILED, INTERRUPTED)
#: run.json keys that say how a run ended and whether it was resumed (never a run parameter).
RUN_OUTCOME = ("state", "finished", "failed_step", "error", "bad_input", "resume", "resumed")
# What must be equal for a run to resume another's folder: its parameters (the bookkeeping may differ).
_BOOKKEEPING = (
    "run_id",
    "run_dir",
    "started",
    "state",
    "finished",
    "failed_step",
    "error",
    "bad_input",
    "resume",
    "resumed",
    "promotion",
)


def _resume(run: RunLayout, holder: dict, record: dict) -> RunLayout:
    """Take over a failed or interrupted run's folder that was marked for resuming (:func:`mark_resume`): same
    parameters, new run id; its checkpoints and data are reused."""
    differ = _differences(holder, record)
    if differ:
        raise HablaError(f"{storage.absolute(run.root)} was started with other parameters ({', '.join(differ)}): "
                         "resume it with the same ones, or give this run another run_name")  # fmt: skip
    earlier = [*holder.get("resumed", []), {"run_id": holder.get("run_id"), "state": holder.get("state"),
                                            "started": holder.get("started")}]  # fmt: skip
    state.write(run.record, {**record, "started": holder.get("started") or record["started"], "resumed": earlier})
    return run


def _differences(holder: dict, record: dict) -> list[str]:
    return sorted(k for k in set(holder) | set(record) if k not in _BOOKKEEPING and holder.get(k) != record.get(k))


def mark_resume(run_dir: str, params: RunParameters) -> dict:
    """Let the next run with this folder's run_name resume it: only a failed or interrupted run with the same
    parameters can be. Returns its record; HablaError when it cannot be resumed."""
    record = read_record(run_dir)
    where = storage.absolute(run_dir)
    if record.get("state") not in RESUMABLE:
        what = record.get("state") or "started: it may still be running"
        raise HablaError(f"{where} belongs to an earlier run ({what}): only a failed or interrupted run resumes; "
                         "choose another --run-name")  # fmt: skip
    differ = _differences(record, {**params.record(), "run_name": record.get("run_name")})
    if differ:
        raise HablaError(f"{where} was started with other parameters ({', '.join(differ)}): resume it with the same "
                         "ones, or choose another --run-name")  # fmt: skip
    state.write(RunLayout(run_dir).record, {**record, "resume": True})
    return record


def finish(run_dir: str, outcome: str, **details) -> None:
    """Record how a run ended in its run.json (``state``: succeeded, failed or interrupted; when, and for a
    failure the step and its one line). Nothing when the run never got its record."""
    record = state.read(RunLayout(run_dir).record)
    if record is None:
        return
    record.pop("resume", None)
    for key in ("failed_step", "error", "bad_input"):
        record.pop(key, None)
    state.write(RunLayout(run_dir).record, {**record, "state": outcome, "finished": now(), **details})


def read_record(run_dir: str) -> dict:
    """A run's ``run.json``; HablaError when it is missing or corrupt."""
    return state.load(RunLayout(run_dir).record, ("run_name",), what="run record")


def record_decision(run_dir: str, decision: Verdict) -> None:
    """Add the promotion decision and its numbers to the run's ``run.json`` (key ``promotion``)."""
    record = read_record(run_dir)
    record["promotion"] = {**decision.record, "decided": now()}
    state.write(RunLayout(run_dir).record, record)


def record_comparison(run_dir: str, best: dict | None, test_set: str, decision: Verdict) -> None:
    """Note in the run which best model its evaluation compared against, on which test set, and the outcome:
    the promotion step re-compares if the best model changed in between."""
    note = {
        "compared_with": {"run": best.get("run"), "model": best.get("model")} if best else None,
        "test_set": test_set,
        "verdict": "promote" if decision.promote else "keep",
        "decided": now(),
    }
    state.write(RunLayout(run_dir).eval.promotion, note)
