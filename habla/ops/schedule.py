"""``habla schedule``: a KFP recurring run of the release watcher pipeline, created or updated idempotently.

The watcher pipeline (``habla.pipelines.watcher_pipeline``) is uploaded as a version named by its content
hash; the recurring run ``--name`` in ``--watcher-experiment`` is created if missing, left alone if it
already matches (a second call changes nothing), and replaced if the cron, the parameters or the pipeline
version changed — so a new habla release never leaves the schedule on a stale version (kfp #11542).
It always runs with ``max_concurrency=1`` (two polls never overlap) and ``no_catchup=True`` (after a pause,
one poll, not one per missed slot).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from habla.core.errors import HablaError
from habla.kubeflow.compile import CompileOptions
from habla.runs.parameters import RunParameters

# robfig/cron (KFP's scheduler) with a seconds field: second minute hour day-of-month month day-of-week. Each field
# a comma list of *, ?, N, N-M, */S, N/S or N-M/S; months and days also by name (JAN, SUN); no L, W or #.
FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31), ("month", 1, 12),
          ("day-of-week", 0, 6))  # fmt: skip
_NAMES = {
    "month": {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())},
    "day-of-week": {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())},
}
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February 29 exists, in leap years


def _values(text: str, field: str, low: int, high: int) -> set[int] | None:
    """The values a cron field matches (None: ``*`` or ``?``, every value); ValueError when it is not one."""
    if text in ("*", "?"):
        return None
    out: set[int] = set()
    names = _NAMES.get(field, {})

    def number(part: str) -> int:
        value = names.get(part.upper()) if part.upper() in names else int(part) if part.isdigit() else None
        if value is None or not low <= value <= high:
            raise ValueError(f"{part!r} is not a {field} ({low}-{high})")
        return value

    for item in text.split(","):
        span, slash, step_text = item.partition("/")
        step = int(step_text) if step_text.isdigit() and int(step_text) > 0 else None
        if slash and step is None:
            raise ValueError(f"{item!r}: the step after / must be a whole number > 0")
        if span in ("*", "?"):
            first, last = low, high
        elif "-" in span:
            first, last = (number(p) for p in span.split("-", 1))
        else:
            first = number(span)
            last = high if slash else first
        if first > last:
            raise ValueError(f"{item!r}: the range runs backwards")
        out.update(range(first, last + 1, step or 1))
    return out


def validate_cron(cron: str) -> str:
    """The cron expression, normalized to single spaces; HablaError unless KFP's scheduler (robfig/cron, 6 fields)
    takes it and it fires at least once (``0 0 0 31 2 *``, February 31st, never would)."""
    cron = " ".join(cron.split())
    fields = cron.split(" ")
    if len(fields) == 5:
        raise HablaError(f"--cron {cron!r}: KFP crons have 6 fields, seconds first; did you mean '0 {cron}'?")
    if len(fields) != 6:
        raise HablaError(
            f"--cron {cron!r}: expected 6 fields 'second minute hour day-of-month month day-of-week', "
            "e.g. '0 0 6 * * *' (every day at 06:00)"
        )
    values = {}
    for text, (field, low, high) in zip(fields, FIELDS):
        try:
            values[field] = _values(text, field, low, high)
        except ValueError as exc:
            raise HablaError(f"--cron {cron!r}: {field}: {exc}") from None
    days, months, weekdays = values["day-of-month"], values["month"], values["day-of-week"]
    # robfig/cron: a day matches when both day fields match, or either one when neither is * or ?.
    if days is not None and weekdays is None:
        possible = any(day <= _DAYS_IN_MONTH[month - 1] for day in days for month in (months or range(1, 13)))
        if not possible:
            raise HablaError(f"--cron {cron!r}: never fires (no month of those has those days)")
    return cron


def check_training_params(params: dict) -> None:
    """The training runs' parameters the watcher will submit, checked now (HablaError), not at each release."""
    try:
        training = json.loads(params.get("training_params") or "{}")
    except ValueError:
        raise HablaError("training_params is not JSON") from None
    if not isinstance(training, dict):
        raise HablaError("training_params must be a JSON object of pipeline parameters")
    RunParameters.for_each_release(training, params.get("output_root") or "", params.get("locale") or "es")


WEEKDAYS = "SUN MON TUE WED THU FRI SAT".split()


def plan(*, name: str, experiment: str, cron: str, params: dict, compile_options: CompileOptions,
         enabled: bool = True) -> dict:  # fmt: skip
    """What :func:`schedule` would create, checked as it checks it, without talking to KFP (``--dry-run``): the
    normalized cron and what its day-of-week field means (0 or SUN is Sunday … 6 or SAT Saturday; 7 is not a
    day), the watcher's parameters and the compile options."""
    cron = validate_cron(cron)
    check_training_params(params)
    weekdays = _values(cron.split(" ")[5], "day-of-week", 0, 6)
    return {
        "name": name,
        "experiment": experiment,
        "cron": cron,
        "fields": dict(zip([f for f, _, _ in FIELDS], cron.split(" "))),
        "days_of_week": "every day" if weekdays is None else [WEEKDAYS[d] for d in sorted(weekdays)],
        "time_zone": "KFP's cronScheduleTimezone (pipeline-install-config; default UTC)",
        "enabled": enabled,
        "max_concurrency": 1,
        "no_catchup": True,
        "parameters": params,
        "compile_options": json.loads(compile_options.to_json()),
    }


def schedule(
    *,
    host: str | None,
    namespace: str | None,
    name: str,
    experiment: str,
    cron: str,
    params: dict,
    compile_options: CompileOptions,
    enabled: bool = True,
    token_file: str | None = None,
    service_account: str | None = None,
):
    """Create or update the recurring run ``name`` of the watcher pipeline compiled with ``compile_options``
    (its own image; the images and fan-out of the training pipeline it submits), its runs running as
    ``service_account`` (default kfp_api.PIPELINE_SERVICE_ACCOUNT: the Roles of manifests/base let it take Leases
    and submit runs; '' for the namespace's default). Returns the RecurringRef."""
    from habla.kubeflow import kfp_api, recurring
    from habla.pipelines import watcher_pipeline

    cron = validate_cron(cron)
    check_training_params(params)
    client = kfp_api.connect(host, namespace=namespace, token_file=token_file)
    account = kfp_api.PIPELINE_SERVICE_ACCOUNT if service_account is None else service_account
    with tempfile.TemporaryDirectory(prefix="habla-schedule-") as tmp:
        package = watcher_pipeline.compile_pipeline(str(Path(tmp, "watcher_pipeline.yaml")), compile_options)
        return recurring.ensure_recurring_run(
            client,
            package_path=package,
            name=name,
            experiment=experiment,
            cron=cron,
            params=params,
            max_concurrency=1,
            no_catchup=True,
            enabled=enabled,
            service_account=account,
        )


def unschedule(
    *, host: str | None, namespace: str | None, name: str, experiment: str, token_file: str | None = None
) -> int:
    """Delete the recurring runs named ``name``; how many there were."""
    from habla.kubeflow import kfp_api, recurring

    client = kfp_api.connect(host, namespace=namespace, token_file=token_file)
    return recurring.delete_recurring_run(client, experiment, name)
