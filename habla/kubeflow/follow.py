"""Create a TrainJob or PyTorchJob on the cluster, follow it to the end, clean it up.

- :func:`run_on_cluster` creates the job (habla.kubeflow.jobs builds it) through the official ``kubernetes``
  client, or adopts the job of the same name that an earlier attempt of the same step created; follows
  ``.status.conditions`` into the log; raises :class:`~habla.core.errors.HablaError` when the job fails or
  times out; deletes the job at the end (also on failure and interrupt) unless ``keep``.
- :func:`job_state` reads a job's status into one line.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from habla.core.errors import Fault, HablaError, one_line
from habla.kubeflow.api import api_error, is_transient, kubernetes_client, status_of
from habla.kubeflow.jobs import (
    KINDS,
    SPEC_HASH_ANNOTATION,
    JobKind,
    Log,
    TrainLaunch,
    build_disruption_budget,
    build_job,
    owner_reference,
    print_log,
    spec_hash,
)

# What run_on_cluster asks of the API server: manifests/ must grant all of it (tests check the Role). ``patch``
# re-points an adopted job's owner to the step's new pod; ``pods get`` reads the launcher's own pod (its uid).
REQUIRED_PERMISSIONS: tuple[tuple[str, str, str], ...] = (
    tuple((k.group, k.plural, verb) for k in KINDS.values() for verb in ("create", "get", "delete", "patch"))
    + (("", "pods", "list"), ("", "pods", "get"), ("", "pods/log", "get"))
    + (("policy", "poddisruptionbudgets", "create"),)
)


# -------------------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class JobState:
    phase: str  # "pending", "running", "succeeded" or "failed"
    summary: str  # one line for the log

    @property
    def done(self) -> bool:
        return self.phase in ("succeeded", "failed")


def job_state(obj: Mapping[str, Any]) -> JobState:
    """Read a TrainJob's or PyTorchJob's ``.status``: conditions Complete/Succeeded, Failed, Created, Running..."""
    status = obj.get("status") or {}
    true = [c for c in status.get("conditions") or [] if str(c.get("status")) == "True"]

    def describe(cond: Mapping[str, Any]) -> str:
        text = str(cond.get("type"))
        if cond.get("reason") and cond.get("reason") != cond.get("type"):
            text += f" ({cond['reason']})"
        if cond.get("message"):
            text += ": " + " ".join(str(cond["message"]).split())[:300]
        return text

    failed = [c for c in true if c.get("type") == "Failed"]
    if failed:
        return JobState("failed", describe(failed[-1]))
    done = [c for c in true if c.get("type") in ("Complete", "Succeeded")]
    if done:
        return JobState("succeeded", describe(done[-1]))
    replicas = _replica_summary(status)
    if true:
        last = true[-1]
        phase = "running" if last.get("type") in ("Running", "Restarting") or replicas else "pending"
        return JobState(phase, describe(last) + (f"; {replicas}" if replicas else ""))
    return JobState("running" if replicas else "pending", replicas or "waiting for the controller")


def _replica_summary(status: Mapping[str, Any]) -> str:
    """'node: 2 active' (TrainJob jobsStatus) or 'Master: 1 active, Worker: 1 active' (PyTorchJob)."""
    parts = []
    for job in status.get("jobsStatus") or []:
        counts = [f"{job[k]} {k}" for k in ("active", "ready", "succeeded", "failed", "suspended") if job.get(k)]
        if counts:
            parts.append(f"{job.get('name')}: {', '.join(counts)}")
    for rtype, rs in sorted((status.get("replicaStatuses") or {}).items()):
        counts = [f"{rs[k]} {k}" for k in ("active", "succeeded", "failed") if isinstance(rs, dict) and rs.get(k)]
        if counts:
            parts.append(f"{rtype}: {', '.join(counts)}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------ cluster API


def _api_error(exc: Any, kind: JobKind, verb: str, namespace: str, name: str = "") -> HablaError | Fault:
    where = f"{kind.plural}.{kind.group} in namespace {namespace}"
    return api_error(
        exc,
        f"{verb} {kind.kind} {namespace}/{name}" if name else f"{verb} {where}",
        rbac=f"{verb} {where}",
        forbidden="apply manifests/ (kubectl apply -k manifests/overlays/<overlay>) and run the step under a service "
        "account bound to habla-launcher",
        missing=f"{kind.api_version} {kind.plural} not found in namespace {namespace}: is {kind.installs_with} "
        "installed and does the namespace exist?"
        if verb == "create"
        else "",
    )


class _Cluster:
    """The few API calls run_on_cluster makes, for one kind of job in one namespace."""

    TIMEOUT = 60  # seconds per request: a hung connection must not hang the step

    def __init__(self, api_client: Any, kind: JobKind, namespace: str):
        import urllib3
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.kind = kind
        self.namespace = namespace
        self.ApiException = ApiException
        # Everything a call can raise short of a bug: an HTTP error answer, or no answer.
        self.errors: tuple[type[BaseException], ...] = (ApiException, urllib3.exceptions.HTTPError, OSError)

    def _args(self) -> dict[str, str]:
        k = self.kind
        return {"group": k.group, "version": k.version, "namespace": self.namespace, "plural": k.plural}

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(body=body, _request_timeout=self.TIMEOUT, **self._args())

    def get(self, name: str) -> dict[str, Any] | None:
        """The job, or None if there is none of that name."""
        try:
            return self.custom.get_namespaced_custom_object(name=name, _request_timeout=self.TIMEOUT, **self._args())
        except self.ApiException as exc:
            if exc.status == 404:
                return None
            if is_transient(exc):
                raise
            raise _api_error(exc, self.kind, "get", self.namespace) from None

    def set_owner(self, name: str, owner: Mapping[str, str]) -> None:
        """Make ``owner`` the job's (only) owner: a JSON merge patch of ``metadata.ownerReferences``."""
        body = {"metadata": {"ownerReferences": [owner_reference(owner)]}}
        self.custom.patch_namespaced_custom_object(name=name, body=body, _request_timeout=self.TIMEOUT, **self._args())

    def create_disruption_budget(self, body: dict[str, Any]) -> None:
        from kubernetes import client

        client.PolicyV1Api(self.custom.api_client).create_namespaced_pod_disruption_budget(
            self.namespace, body, _request_timeout=self.TIMEOUT
        )

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(
            name=name, propagation_policy="Background", _request_timeout=self.TIMEOUT, **self._args()
        )

    def pods(self, name: str) -> list[tuple[str, str]]:
        """(pod name, phase) of the job's pods, sorted by name; [] if they cannot be listed."""
        try:
            listing = self.core.list_namespaced_pod(
                self.namespace, label_selector=f"{self.kind.pod_label}={name}", _request_timeout=self.TIMEOUT
            )
        except self.errors:  # pods are a courtesy in the log: never fail the step over them
            return []
        return sorted((p.metadata.name, (p.status.phase if p.status else None) or "Unknown") for p in listing.items)

    def log_tail(self, pod: str, lines: int) -> str | None:
        try:
            return self.core.read_namespaced_pod_log(
                pod, self.namespace, tail_lines=lines, _request_timeout=self.TIMEOUT
            )
        except self.errors:
            return None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Kubernetes stops a cancelled step with SIGTERM: turn it into KeyboardInterrupt so cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_on_cluster(
    launch: TrainLaunch,
    kind: str = "trainjob",
    *,
    poll_s: float = 15.0,
    timeout_s: float | None = None,
    keep: bool = False,
    log: Log = print_log,
    api_client: Any = None,
    log_tail_lines: int = 50,
) -> dict[str, Any]:
    """Run ``launch`` as a TrainJob or PyTorchJob, follow it to the end and return its final ``.status``.

    Idempotent per job name: if a job of that name exists with the same spec (an earlier attempt of the same
    pipeline step), it is followed instead of starting another; one that had failed is replaced. Raises
    HablaError when the job fails, disappears or outlives ``timeout_s``. The job is deleted at the end whatever
    happened (success, failure, timeout, SIGTERM/Ctrl-C), unless ``keep``.
    """
    body = build_job(launch, kind)
    jk = KINDS[kind]
    name, namespace = launch.name, launch.namespace
    if poll_s <= 0:
        raise HablaError(f"poll_s must be > 0, got {poll_s}")
    cluster = _Cluster(kubernetes_client(api_client), jk, namespace)
    gpus = f", {launch.gpus_per_node} GPU(s)" if launch.gpus_per_node else ""
    log(
        f"{jk.kind} {namespace}/{name}: {launch.nodes} node(s) x {launch.procs_per_node} process(es){gpus} per "
        f"node, image {launch.image}"
    )
    if kind == "trainjob" and (launch.node_selector or launch.tolerations or launch.priority_class):
        log(f"TrainJob {name}: node selector, tolerations and priority class come from ClusterTrainingRuntime "
            f"{launch.runtime} (docs/operators.md)")  # fmt: skip
    ours = True  # whether the job under this name is this step's to clean up
    try:
        with _sigterm_as_interrupt():
            try:
                created = _create_or_adopt(cluster, body, log, poll_s, launch.owner)
            except HablaError:
                ours = False  # nothing was created, or the job of that name belongs to something else
                raise
            if created is not None and launch.disruption_budget:
                _protect(cluster, launch, kind, created, log)
            return _follow(cluster, name, log, poll_s, timeout_s, log_tail_lines)
    except KeyboardInterrupt:
        log(f"{jk.kind} {name}: interrupted")
        raise
    finally:
        if ours and keep:
            log(f"{jk.kind} {name}: kept (kubectl delete {jk.plural}.{jk.group} -n {namespace} {name})")
        elif ours:
            _delete_quietly(cluster, name, log)


def _protect(cluster: _Cluster, launch: TrainLaunch, kind: str, job: Mapping[str, Any], log: Log) -> None:
    """Give the new job a PodDisruptionBudget (logged, never fatal: training matters more than the drain guard)."""
    uid = (job.get("metadata") or {}).get("uid")
    if not uid:
        return
    try:
        budget = build_disruption_budget(launch, kind, uid)
        cluster.create_disruption_budget(budget)
        log(f"{cluster.kind.kind} {launch.name}: PodDisruptionBudget {budget['metadata']['name']} (no voluntary "
            "evictions)")  # fmt: skip
    except cluster.errors as exc:
        if status_of(exc) != 409:
            log(f"{cluster.kind.kind} {launch.name}: no PodDisruptionBudget ({one_line(exc, first_line=True)})")


def _create_or_adopt(
    cluster: _Cluster, body: dict[str, Any], log: Log, poll_s: float, owner: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """Create the job (returns it as created); if one of that name exists, adopt it (same spec; returns None,
    and makes ``owner`` its owner: the step's new pod) or replace it (it had failed)."""
    jk, ns = cluster.kind, cluster.namespace
    name = body["metadata"]["name"]
    wanted_hash = body["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    deadline = time.monotonic() + max(120.0, 10 * poll_s)  # how long a replaced job may take to go away
    while True:
        try:
            created = cluster.create(body)
            log(f"{jk.kind} {name}: created")
            return created if isinstance(created, dict) else {}
        except cluster.errors as exc:
            if status_of(exc) != 409:
                raise _api_error(exc, jk, "create", ns, name) from None
        if time.monotonic() > deadline:
            raise HablaError(f"{jk.kind} {ns}/{name} exists but could not be adopted or replaced; try again later")
        existing = cluster.get(name)
        if existing is None:
            continue  # deleted in between: create it again
        meta = existing.get("metadata") or {}
        if meta.get("deletionTimestamp"):  # a replaced job on its way out
            time.sleep(poll_s)
            continue
        if spec_hash(existing) != wanted_hash:
            raise HablaError(
                f"{jk.kind} {ns}/{name} already exists with a different spec: delete it "
                f"(kubectl delete {jk.plural}.{jk.group} -n {ns} {name}) or use another job name"
            )
        state = job_state(existing)
        if state.phase == "failed":
            log(f"{jk.kind} {name}: an earlier attempt failed ({state.summary}); deleting it and starting again")
            _delete_quietly(cluster, name, log)
            continue
        log(f"{jk.kind} {name}: exists from an earlier attempt of this step; following it ({state.summary})")
        if owner and [r.get("uid") for r in meta.get("ownerReferences") or []] != [owner["uid"]]:
            try:
                cluster.set_owner(name, owner)
            except cluster.errors as exc:
                log(f"{jk.kind} {name}: could not make this pod its owner ({one_line(exc, first_line=True)})")
        return None


def _follow(
    cluster: _Cluster, name: str, log: Log, poll_s: float, timeout_s: float | None, tail_lines: int
) -> dict[str, Any]:
    """Poll the job until it succeeds (return its status) or fails (HablaError), logging every change."""
    jk = cluster.kind
    started = time.monotonic()
    last_summary = last_pods = None
    errors = 0
    while True:
        try:
            obj = cluster.get(name)
        except cluster.errors as exc:  # API server restarting, throttling, connection reset: retry a while
            errors += 1
            why = one_line(exc, with_type=True, first_line=True)
            if errors > 5:
                raise HablaError(f"lost contact with the Kubernetes API following {jk.kind} {name}: {why}") from None
            log(f"{jk.kind} {name}: API error ({why}), retrying")
            time.sleep(poll_s)
            continue
        errors = 0
        if obj is None:
            raise HablaError(f"{jk.kind} {cluster.namespace}/{name} disappeared (deleted by someone else?)")
        state = job_state(obj)
        if state.summary != last_summary:
            log(f"{jk.kind} {name}: {state.summary}")
            last_summary = state.summary
        pods = _pod_summary(cluster.pods(name))
        if pods and pods != last_pods:
            log(f"{jk.kind} {name}: pods {pods}")
            last_pods = pods
        if state.phase == "succeeded":
            log(f"{jk.kind} {name}: succeeded after {time.monotonic() - started:.0f} s")
            return dict(obj.get("status") or {})
        if state.phase == "failed":
            _log_failed_pods(cluster, name, log, tail_lines)
            raise HablaError(f"{jk.kind} {cluster.namespace}/{name} failed: {state.summary}")
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise HablaError(f"{jk.kind} {name} did not finish within {timeout_s:.0f} s (last: {state.summary})")
        time.sleep(poll_s)


def _pod_summary(pods: list[tuple[str, str]]) -> str:
    """'1 Pending, 2 Running'."""
    counts: dict[str, int] = {}
    for _, phase in pods:
        counts[phase] = counts.get(phase, 0) + 1
    return ", ".join(f"{n} {phase}" for phase, n in sorted(counts.items()))


def _log_failed_pods(cluster: _Cluster, name: str, log: Log, tail_lines: int) -> None:
    """Copy the end of the failed pods' logs into the step's log: the cause is usually there."""
    pods = cluster.pods(name)
    failed = [pod for pod, phase in pods if phase == "Failed"] or [pod for pod, _ in pods]
    for pod in failed[:3]:
        text = cluster.log_tail(pod, tail_lines)
        if text is None:
            continue
        log(f"--- last {tail_lines} lines of pod {pod} ---")
        for line in text.splitlines():
            log(f"    {line}")


def _delete_quietly(cluster: _Cluster, name: str, log: Log) -> None:
    """Delete the job; a failure to clean up is logged, never raised over the real outcome."""
    jk = cluster.kind
    try:
        cluster.delete(name)
        log(f"{jk.kind} {name}: deleted")
    except cluster.errors as exc:
        if getattr(exc, "status", None) == 404:
            return
        why = one_line(exc, with_type=True, first_line=True)
        log(
            f"{jk.kind} {name}: could not delete it ({why}); delete it by hand: "
            f"kubectl delete {jk.plural}.{jk.group} -n {cluster.namespace} {name}"
        )
