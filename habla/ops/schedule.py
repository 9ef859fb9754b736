"""``habla schedule``: a KFP recurring run of the release watcher pipeline, created or updated idempotently.

The watcher pipeline (``habla.pipelines.watcher_pipeline``) is uploaded as a version named by its content
hash; the recurring run ``--name`` in ``--watcher-experiment`` is created if missing, left alone if it
already matches (a second call changes nothing), and replaced if the cron, the parameters or the pipeline
version changed — so a new habla release never leaves the schedule on a stale version (kfp #11542).
It always runs with ``max_concurrency=1`` (two polls never overlap) and ``no_catchup=True`` (after a pause,
one poll, not one per missed slot).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from habla.core.errors import HablaError
from habla.kubeflow.compile import CompileOptions

# robfig/cron (KFP's scheduler) with a seconds field: second minute hour day-of-month month day-of-week.
_FIELD = re.compile(r"^[0-9A-Za-z*?/,\-#LW]+$")


def validate_cron(cron: str) -> str:
    """The cron expression, normalized to single spaces; HablaError unless it has KFP's 6 fields."""
    cron = " ".join(cron.split())
    fields = cron.split(" ")
    if len(fields) == 5:
        raise HablaError(f"--cron {cron!r}: KFP crons have 6 fields, seconds first; did you mean '0 {cron}'?")
    if len(fields) != 6 or not all(_FIELD.match(f) for f in fields):
        raise HablaError(
            f"--cron {cron!r}: expected 6 fields 'second minute hour day-of-month month day-of-week', "
            "e.g. '0 0 6 * * *' (every day at 06:00)"
        )
    return cron


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
):
    """Create or update the recurring run ``name`` of the watcher pipeline compiled with ``compile_options``
    (its own image; the images and fan-out of the training pipeline it submits). Returns the RecurringRef."""
    from habla.kubeflow import kfp_api
    from habla.pipelines import watcher_pipeline

    cron = validate_cron(cron)
    client = kfp_api.connect(host, namespace=namespace)
    with tempfile.TemporaryDirectory(prefix="habla-schedule-") as tmp:
        package = watcher_pipeline.compile_pipeline(str(Path(tmp, "watcher_pipeline.yaml")), compile_options)
        return kfp_api.ensure_recurring_run(
            client,
            package_path=package,
            name=name,
            experiment=experiment,
            cron=cron,
            params=params,
            max_concurrency=1,
            no_catchup=True,
            enabled=enabled,
        )


def unschedule(*, host: str | None, namespace: str | None, name: str, experiment: str) -> int:
    """Delete the recurring runs named ``name``; how many there were."""
    from habla.kubeflow import kfp_api

    client = kfp_api.connect(host, namespace=namespace)
    return kfp_api.delete_recurring_run(client, experiment, name)
