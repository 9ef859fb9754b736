"""A thin layer over ``kfp.Client``: connect, upload a pipeline once per content, submit, schedule, list.

Everything here talks to the Kubeflow Pipelines v2beta1 REST API through ``kfp.Client`` and the generated
``kfp_server_api`` services it holds. The calls that would print links (``create_experiment``,
``run_pipeline``, ``upload_pipeline*``) are made through the generated services instead, so that commands
keep a clean stdout. API and connection errors become one-line :class:`HablaError`s.

Pipelines are uploaded as versions named by a hash of the compiled package: the same package is uploaded
once, and a changed one gets a new version that recurring runs are re-pointed to (a recurring run keeps the
version it was created with — kubeflow/pipelines #11542).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from habla.core.errors import HablaError
from habla.kubeflow import kfp_auth
from habla.kubeflow.api import api_error

if TYPE_CHECKING:
    import kfp

log = logging.getLogger(__name__)

HOST_ENV = "KF_PIPELINES_ENDPOINT"  # kfp.Client's own variable for the API address
UI_ENV = "KF_PIPELINES_UI_ENDPOINT"
PAGE_SIZE = 100
# The account runs execute as (manifests/base/serviceaccount.yaml; its Roles let the train step launch jobs).
PIPELINE_SERVICE_ACCOUNT = "habla-pipeline-runner"
# What a multi-user KFP API server authorizes for the calls the release watcher makes (submit_run and what it
# calls): (group, resource, verb) of the SubjectAccessReviews of kubeflow/pipelines backend/src/apiserver/server/
# experiment_server.go (list, create), pipeline_server.go and pipeline_upload_server.go (list, create; versions are
# checked as their pipeline), run_server.go (list, create); 2.16 and 2.17. manifests/base/role-kfp-client.yaml
# grants them (tests/kubeflow/test_manifests.py); the stand-in KFP server enforces them.
REQUIRED_PERMISSIONS: tuple[tuple[str, str, str], ...] = tuple(
    ("pipelines.kubeflow.org", resource, verb)
    for resource in ("experiments", "pipelines", "runs")
    for verb in ("list", "create")
)
# Python types a value of each KFP parameter type may have (bool is an int in Python: refused for numbers).
PARAMETER_TYPES: dict[str, tuple[type, ...]] = {
    "STRING": (str,),
    "NUMBER_INTEGER": (int,),
    "NUMBER_DOUBLE": (int, float),
    "BOOLEAN": (bool,),
    "STRUCT": (dict,),
    "LIST": (list,),
}


@dataclass(frozen=True)
class RunRef:
    """A submitted (or found) run: its id and its page in the KFP UI."""

    run_id: str
    url: str


@dataclass(frozen=True)
class VersionRef:
    """An uploaded pipeline version; ``created`` is False when that content was already there."""

    pipeline_id: str
    version_id: str
    name: str
    created: bool


@dataclass
class KfpRun:
    """One run of an experiment as the API reports it (metrics are not part of the v2beta1 run object)."""

    run_id: str
    name: str
    state: str
    created_at: str
    params: dict[str, Any] = field(default_factory=dict)
    url: str = ""
    error: str = ""


# ------------------------------------------------------------------------------------------- connecting


def resolve_host(host: str | None) -> str:
    """``--host`` or ``$KF_PIPELINES_ENDPOINT``, checked to be an http(s) URL."""
    host = (host or os.environ.get(HOST_ENV) or "").strip().rstrip("/")
    if not host:
        raise HablaError(f"no Kubeflow Pipelines address: pass --host URL or set {HOST_ENV}")
    if not host.startswith(("http://", "https://")):
        raise HablaError(f"--host must start with http:// or https:// (got {host!r})")
    return host


def connect(
    host: str | None = None, *, namespace: str | None = None, token_file: str | None = None, timeout: float = 10.0
) -> kfp.Client:
    """A ``kfp.Client`` for ``host`` (or ``$KF_PIPELINES_ENDPOINT``), after checking that the API answers, without
    a login page in the way, and is KFP 2.16 or newer.

    Multi-user deployments: the token is found as habla.kubeflow.kfp_auth.credentials says (``token_file``,
    ``$HABLA_KFP_TOKEN``, the projected token, a requested one); ``namespace`` is the user namespace (default: the
    pod's own). A standalone KFP needs neither.
    """
    host = resolve_host(host)
    source = kfp_auth.token_source(token_file)
    server = kfp_auth.check_server(host, kfp_auth.read_token(source), timeout)
    auth = kfp_auth.credentials(source, server)
    namespace = kfp_auth.namespace_for(namespace, server)
    import kfp

    with warnings.catch_warnings(), api_errors(f"connect to {host}"):
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later"
        client = kfp.Client(host=host, namespace=namespace or "kubeflow", **auth)
    if namespace:
        client._context_setting["namespace"] = namespace  # kfp.Client keeps "kubeflow" out of its context
    return client


@contextlib.contextmanager
def api_errors(action: str) -> Iterator[None]:
    """Turn API and connection failures into a one-line HablaError that says what was being done (``action``)."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        status = getattr(exc, "status", None)
        if status in (401, 403) or (status == 400 and "authoriz" in _server_message(exc).lower()):
            raise HablaError(
                f"Kubeflow Pipelines refused to {action} (HTTP {status}: {_server_message(exc)}): {kfp_auth.TOKEN_HINT}"
            ) from None
        raise api_error(exc, action, api="Kubeflow Pipelines") from None


def _server_message(exc: BaseException) -> str:
    """The API server's own message (its JSON error body), one line; never the request (or its token)."""
    try:
        message = json.loads(getattr(exc, "body", "") or "{}").get("message", "")
    except (ValueError, AttributeError):
        message = ""
    return " ".join(str(message).split())[:300] or str(getattr(exc, "reason", "") or "")


def _ui_url(client: kfp.Client, path: str) -> str:
    base = os.environ.get(UI_ENV) or client.runs.api_client.configuration.host  # the API host serves the UI too
    return f"{base.rstrip('/')}/#/{path}"


def name_filter(name: str) -> str:
    # The exact form kfp.Client itself sends (operation 1 = EQUALS), known to work with the real server.
    return json.dumps({"predicates": [{"operation": 1, "key": "display_name", "stringValue": name}]})


def _created_or_found(create, find):
    """``create()``, or ``find()`` when the API answers 409 (a concurrent caller created it first)."""
    import kfp_server_api

    try:
        return create()
    except kfp_server_api.ApiException as exc:
        if exc.status != 409:
            raise
    found = find()
    if found is None:
        raise HablaError("Kubeflow Pipelines said 'already exists' but the object cannot be found")
    return found


def pages(list_call, items: str, **kwargs) -> Iterator[Any]:
    """Every item of a paginated v2beta1 list call."""
    token = ""
    while True:
        response = list_call(page_token=token, page_size=PAGE_SIZE, **kwargs)
        yield from getattr(response, items) or []
        token = response.next_page_token or ""
        if not token:
            return


# ----------------------------------------------------------------------------------- compiled packages


def _spec(package_path: str) -> dict:
    import yaml

    try:
        with open(package_path, encoding="utf-8") as f:
            spec = next(yaml.safe_load_all(f))  # a second document, if any, is the platform spec
    except (OSError, yaml.YAMLError, StopIteration) as exc:
        raise HablaError(f"{package_path}: not a compiled pipeline ({exc})") from None
    if not isinstance(spec, dict) or "pipelineInfo" not in spec or "root" not in spec:
        raise HablaError(f"{package_path}: not a compiled KFP pipeline (no pipelineInfo/root)")
    return spec


def package_digest(package_path: str) -> str:
    """SHA-256 of the compiled package: the identity of a pipeline version."""
    return hashlib.sha256(Path(package_path).read_bytes()).hexdigest()


def pipeline_name(package_path: str) -> str:
    return _spec(package_path)["pipelineInfo"]["name"]


def pipeline_parameters(package_path: str) -> dict[str, dict]:
    """The pipeline's input parameters: name -> ``{"parameterType": ..., "defaultValue"?: ...}``."""
    return _spec(package_path)["root"].get("inputDefinitions", {}).get("parameters", {})


def explicit_params(package_path: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` completed with the pipeline's defaults, checked against its inputs.

    The KFP compare view shows only parameters passed explicitly at submission, not defaults, so every
    parameter is passed; an unknown name is refused here rather than failing the run later.
    """
    declared = pipeline_parameters(package_path)
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise HablaError(f"unknown pipeline parameter(s) {', '.join(unknown)}; it takes {', '.join(sorted(declared))}")
    full = {k: v["defaultValue"] for k, v in declared.items() if "defaultValue" in v}
    full.update(params)
    for key, value in full.items():
        kind = declared[key]["parameterType"]
        if kind == "NUMBER_INTEGER" and isinstance(value, float) and value.is_integer():
            value = full[key] = int(value)  # the compiler writes integer defaults as 1.0
        if kind == "STRING" and isinstance(value, int) and not isinstance(value, bool):
            value = full[key] = str(value)  # a count KFP needs as a string (gpus_per_node=8 from habla watch --param)
        allowed = PARAMETER_TYPES.get(kind, (object,))
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise HablaError(f"pipeline parameter {key}={value!r} is not a {kind}")
    missing = sorted(k for k, v in declared.items() if k not in full and not v.get("isOptional"))
    if missing:
        raise HablaError(f"missing pipeline parameter(s) {', '.join(missing)}")
    return full


# ------------------------------------------------------------------------------- experiments, versions


def find_experiment(client: kfp.Client, name: str) -> str | None:
    """The id of the experiment named ``name``, or None."""
    with api_errors(f"look up experiment {name!r}"):
        try:
            return client.get_experiment(experiment_name=name, namespace=client.get_user_namespace()).experiment_id
        except ValueError as exc:
            if str(exc).startswith("No experiment is found"):
                return None
            raise HablaError(str(exc)) from None


def ensure_experiment(client: kfp.Client, name: str) -> str:
    """The id of the experiment named ``name``, created if missing."""
    import kfp_server_api

    experiment_id = find_experiment(client, name)
    if experiment_id:
        return experiment_id
    body = kfp_server_api.V2beta1Experiment(display_name=name, namespace=client.get_user_namespace() or None)
    with api_errors(f"create experiment {name!r}"):
        return _created_or_found(
            lambda: client.experiments.experiment_service_create_experiment(experiment=body).experiment_id,
            lambda: find_experiment(client, name),
        )


def _find_pipeline(client: kfp.Client, name: str) -> str | None:
    found = client.list_pipelines(
        filter=name_filter(name), namespace=client.get_user_namespace() or None, page_size=2
    ).pipelines
    if found and len(found) > 1:
        raise HablaError(f"several pipelines are named {name!r}; delete the extra ones")
    return found[0].pipeline_id if found else None


def _find_version(client: kfp.Client, pipeline_id: str, version_name: str) -> str | None:
    found = client.list_pipeline_versions(pipeline_id, page_size=1, filter=name_filter(version_name))
    return found.pipeline_versions[0].pipeline_version_id if found.pipeline_versions else None


def ensure_pipeline_version(client: kfp.Client, package_path: str, name: str | None = None) -> VersionRef:
    """The pipeline version holding exactly this package, uploaded if no version has its content hash.

    The pipeline ``name`` defaults to the package's own; versions are named ``<name>-<12 hex of sha256>``.
    Safe against a concurrent caller doing the same (an "already exists" answer means: look it up).
    """
    import kfp_server_api

    name = name or pipeline_name(package_path)
    version_name = f"{name}-{package_digest(package_path)[:12]}"
    with api_errors(f"upload pipeline {name!r}"):
        pipeline_id = _find_pipeline(client, name)
        if pipeline_id is None:
            body = kfp_server_api.V2beta1Pipeline(display_name=name, namespace=client.get_user_namespace() or None)
            pipeline_id = _created_or_found(
                lambda: client.pipelines.pipeline_service_create_pipeline(pipeline=body).pipeline_id,
                lambda: _find_pipeline(client, name),
            )
        version_id = _find_version(client, pipeline_id, version_name)
        if version_id:
            return VersionRef(pipeline_id, version_id, version_name, False)
        version_id = _created_or_found(
            lambda: (
                client.pipeline_uploads.upload_pipeline_version(
                    package_path, name=version_name, pipelineid=pipeline_id
                ).pipeline_version_id
            ),
            lambda: _find_version(client, pipeline_id, version_name),
        )
    log.info("uploaded pipeline %s version %s", name, version_name)
    return VersionRef(pipeline_id, version_id, version_name, True)


# ------------------------------------------------------------------------------------------------- runs


def find_run(client: kfp.Client, experiment_id: str, run_name: str) -> RunRef | None:
    """A run of the experiment with this display name, if one exists (the newest)."""
    with api_errors(f"look up run {run_name!r}"):
        response = client.list_runs(
            experiment_id=experiment_id, filter=name_filter(run_name), sort_by="created_at desc", page_size=1
        )
    runs = response.runs or []
    return RunRef(runs[0].run_id, _ui_url(client, f"runs/details/{runs[0].run_id}")) if runs else None


def count_runs(client: kfp.Client, experiment_id: str, run_name: str) -> int:
    """How many runs of the experiment have this display name."""
    with api_errors(f"look up runs {run_name!r}"):
        return sum(
            1 for _ in pages(client.list_runs, "runs", experiment_id=experiment_id, filter=name_filter(run_name))
        )


def submit_run(
    host: str | None,
    pipeline_package: str,
    params: dict[str, Any],
    experiment: str,
    run_name: str,
    *,
    client: kfp.Client | None = None,
    namespace: str | None = None,
    service_account: str = PIPELINE_SERVICE_ACCOUNT,
    token_file: str | None = None,
) -> RunRef:
    """Submit one run of a compiled pipeline package to the experiment (created if missing).

    The run's steps run as ``service_account`` (manifests/ creates PIPELINE_SERVICE_ACCOUNT with the Roles a
    step and the train step need); empty: the namespace's default (KFP's pipeline-runner or default-editor).

    The package is uploaded as a pipeline version once per content (:func:`ensure_pipeline_version`), and
    the run references that version. Every pipeline parameter is passed explicitly (defaults filled in), so
    the KFP compare view shows them all. Pass ``client`` to reuse a connection.
    """
    import kfp_server_api

    client = client or connect(host, namespace=namespace, token_file=token_file)
    arguments = explicit_params(pipeline_package, params)
    experiment_id = ensure_experiment(client, experiment)
    version = ensure_pipeline_version(client, pipeline_package)
    body = kfp_server_api.V2beta1Run(
        experiment_id=experiment_id,
        display_name=run_name,
        pipeline_version_reference=kfp_server_api.V2beta1PipelineVersionReference(
            pipeline_id=version.pipeline_id, pipeline_version_id=version.version_id
        ),
        runtime_config=kfp_server_api.V2beta1RuntimeConfig(parameters=arguments),
        service_account=service_account or None,
    )
    with api_errors(f"submit run {run_name!r}"):
        run = client.runs.run_service_create_run(run=body)
    log.info("submitted run %s (%s)", run_name, run.run_id)
    return RunRef(run.run_id, _ui_url(client, f"runs/details/{run.run_id}"))


def list_runs(client: kfp.Client, experiment: str) -> list[KfpRun]:
    """Every run of the experiment with its runtime parameters, oldest first."""
    experiment_id = find_experiment(client, experiment)
    if experiment_id is None:
        raise HablaError(f"no experiment named {experiment!r}")
    runs = []
    with api_errors(f"list the runs of {experiment!r}"):
        for run in pages(client.list_runs, "runs", experiment_id=experiment_id, sort_by="created_at"):
            runs.append(
                KfpRun(
                    run_id=run.run_id,
                    name=run.display_name or run.run_id,
                    state=str(run.state or ""),
                    created_at=run.created_at.isoformat() if run.created_at else "",
                    params=dict((run.runtime_config.parameters if run.runtime_config else None) or {}),
                    url=_ui_url(client, f"runs/details/{run.run_id}"),
                    error=(run.error.message or "") if run.error else "",
                )
            )
    return runs
