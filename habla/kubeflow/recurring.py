"""Recurring runs (``habla schedule``): the one recurring run of a name in an experiment, created or brought up
to date idempotently, and deleted.

A recurring run keeps the pipeline version it was created with (kubeflow/pipelines #11542): a changed package
gets a new version (habla.kubeflow.kfp_api.ensure_pipeline_version) and the recurring run is re-pointed to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from habla.kubeflow import kfp_api

if TYPE_CHECKING:
    import kfp


@dataclass(frozen=True)
class RecurringRef:
    """A recurring run after :func:`ensure_recurring_run`; ``action`` is created, updated or unchanged."""

    recurring_run_id: str
    version_id: str
    action: str


def _normalized(value: Any) -> Any:
    """Parameters as the server echoes them (numbers travel as doubles): 2.0 and 2 compare equal."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _normalized(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    return value


def _same_schedule(
    existing,
    version: kfp_api.VersionRef,
    cron: str,
    params: dict,
    max_concurrency: int,
    no_catchup: bool,
    enabled: bool,
    service_account: str,
) -> bool:
    ref = existing.pipeline_version_reference
    trigger = existing.trigger.cron_schedule if existing.trigger else None
    return (
        ref is not None
        and ref.pipeline_version_id == version.version_id
        and trigger is not None
        and trigger.cron == cron
        and _normalized((existing.runtime_config.parameters if existing.runtime_config else None) or {})
        == _normalized(params)
        and str(existing.max_concurrency) == str(max_concurrency)
        and bool(existing.no_catchup) == no_catchup
        and (existing.mode == "ENABLE") == enabled
        and (existing.service_account or "") == service_account
    )


def find_recurring_runs(client: kfp.Client, experiment_id: str, name: str) -> list:
    """The recurring runs of the experiment with this display name (normally zero or one)."""
    with kfp_api.api_errors(f"list the recurring runs named {name!r}"):
        listed = client.list_recurring_runs
        return list(
            kfp_api.pages(listed, "recurring_runs", experiment_id=experiment_id, filter=kfp_api.name_filter(name))
        )


def ensure_recurring_run(
    client: kfp.Client,
    *,
    package_path: str,
    name: str,
    experiment: str,
    cron: str,
    params: dict[str, Any],
    max_concurrency: int = 1,
    no_catchup: bool = True,
    enabled: bool = True,
    service_account: str = kfp_api.PIPELINE_SERVICE_ACCOUNT,
) -> RecurringRef:
    """Create, or bring up to date, the one recurring run called ``name`` in the experiment. Idempotent.

    Its runs run as ``service_account`` ('' for the namespace's default: KFP's pipeline-runner or default-editor,
    which cannot take Leases or, in a profile, submit runs through the API).
    An existing recurring run that already matches (same pipeline version, cron, parameters, concurrency,
    catch-up, mode and service account) is left alone. One that differs is replaced: the v2beta1 API cannot edit a
    recurring run, so the new one is created first and the old one(s) deleted after — a few seconds with two
    schedules rather than a window with none if the creation fails.
    """
    experiment_id = kfp_api.ensure_experiment(client, experiment)
    version = kfp_api.ensure_pipeline_version(client, package_path)
    arguments = kfp_api.explicit_params(package_path, params)
    existing = find_recurring_runs(client, experiment_id, name)
    matching = [
        r
        for r in existing
        if _same_schedule(r, version, cron, arguments, max_concurrency, no_catchup, enabled, service_account)
    ]
    if matching and len(existing) == 1:
        return RecurringRef(matching[0].recurring_run_id, version.version_id, "unchanged")
    keep = matching[0] if matching else None
    if keep is None:
        with kfp_api.api_errors(f"create recurring run {name!r}"):
            keep = client.create_recurring_run(
                experiment_id=experiment_id,
                job_name=name,
                description="habla: look for new Common Voice releases and train on each (habla schedule)",
                cron_expression=cron,
                max_concurrency=max_concurrency,
                no_catchup=no_catchup,
                params=arguments,
                pipeline_id=version.pipeline_id,
                version_id=version.version_id,
                enabled=enabled,
                service_account=service_account or None,
            )
    for old in existing:
        if old.recurring_run_id != keep.recurring_run_id:
            with kfp_api.api_errors(f"delete the outdated recurring run {old.recurring_run_id}"):
                client.delete_recurring_run(old.recurring_run_id)
    return RecurringRef(keep.recurring_run_id, version.version_id, "created" if not existing else "updated")


def delete_recurring_run(client: kfp.Client, experiment: str, name: str) -> int:
    """Delete every recurring run called ``name`` in the experiment; how many there were."""
    experiment_id = kfp_api.find_experiment(client, experiment)
    if experiment_id is None:
        return 0
    existing = find_recurring_runs(client, experiment_id, name)
    for old in existing:
        with kfp_api.api_errors(f"delete recurring run {old.recurring_run_id}"):
            client.delete_recurring_run(old.recurring_run_id)
    return len(existing)
