"""Run the unchanged ``habla train`` on N nodes x G processes: as a Kubeflow Trainer v2 ``TrainJob``, as a
Training Operator ``PyTorchJob``, or under torchrun on this machine.

Plain functions, no KFP: the pipeline's train component (and ``habla launch``) call them.

- :func:`build_trainjob` / :func:`build_pytorchjob` turn a :class:`TrainLaunch` into the custom object (a dict).
- :func:`run_on_cluster` creates it through the official ``kubernetes`` client, or adopts the job of the same
  name that an earlier attempt of the same step created; follows ``.status.conditions`` into the log; raises
  :class:`~habla.errors.HablaError` when the job fails or times out; deletes the job at the end (also on failure
  and interrupt) unless ``keep``.
- :func:`run_local` runs ``torchrun`` here (CPU, gloo) and streams its output.

Credentials never pass through here: the job reads them from a Kubernetes Secret (``secretKeyRef``), so no
secret value can appear in a job spec, a compiled pipeline or a log.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from habla.errors import HablaError

Log = Callable[[str], None]

DEFAULT_S3_SECRET = "habla-s3-credentials"
# Keys of that Secret, each exported under its own name (boto3 and NeMo's S3 reader read them).
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
DEFAULT_RUNTIME = "torch-distributed"
TRAIN_COMMAND = ("habla", "train")  # the console script, as installed in the images
LOCAL_PROGRAM = ("-m", "habla.cli", "train")  # the same, run by this Python (no PATH lookup)
SPEC_HASH_ANNOTATION = "habla.kubeflow.org/spec-hash"
# Job names become pod names with suffixes (JobSet: <name>-node-0-0-xxxxx; PyTorchJob: <name>-worker-N).
MAX_NAME = 40


@dataclass(frozen=True)
class JobKind:
    """Where one kind of job lives in the Kubernetes API."""

    kind: str
    group: str
    version: str
    plural: str
    pod_label: str  # the label its pods carry, valued with the job name
    installs_with: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


KINDS: dict[str, JobKind] = {
    "trainjob": JobKind(
        "TrainJob",
        "trainer.kubeflow.org",
        "v1alpha1",
        "trainjobs",
        "jobset.sigs.k8s.io/jobset-name",
        "Kubeflow Trainer v2",
    ),
    "pytorchjob": JobKind(
        "PyTorchJob",
        "kubeflow.org",
        "v1",
        "pytorchjobs",
        "training.kubeflow.org/job-name",
        "the Kubeflow Training Operator (v1)",
    ),
}

# What run_on_cluster asks of the API server: manifests/ must grant all of it (tests check the Role).
REQUIRED_PERMISSIONS: tuple[tuple[str, str, str], ...] = tuple(
    (k.group, k.plural, verb) for k in KINDS.values() for verb in ("create", "get", "delete")
) + (("", "pods", "list"), ("", "pods/log", "get"))

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
# Plain env values end up in the job spec and in compiled pipelines: credentials must come from the Secret.
_SECRET_LOOKING = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|API_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)


@dataclass(frozen=True)
class TrainLaunch:
    """What to run on the cluster: ``torchrun ... habla train <train_args>`` on ``nodes`` pods."""

    image: str
    name: str  # the job's name (see job_name): deterministic per pipeline task so a retry adopts its job
    train_args: tuple[str, ...] = ()
    namespace: str = "kubeflow"
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int | None = None  # processes per node; default: one per GPU, or 1 without GPUs
    cpu: str | None = None  # requests per node, Kubernetes quantities ("8", "500m")
    memory: str | None = None  # request and limit per node ("32Gi")
    s3_secret: str | None = DEFAULT_S3_SECRET  # Secret holding SECRET_KEYS; None: no S3 credentials
    # Non-secret settings for the training pods: AWS_ENDPOINT_URL, AWS_DEFAULT_REGION ...
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    runtime: str = DEFAULT_RUNTIME  # TrainJob: the ClusterTrainingRuntime to use
    service_account: str | None = None  # PyTorchJob pods only (a TrainJob's pods get theirs from the runtime)
    image_pull_policy: str | None = None  # PyTorchJob: "Always", "IfNotPresent", "Never"; None: the default

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1


def job_name(*parts: str, prefix: str = "habla-train") -> str:
    """A DNS-1035 label unique to ``parts`` (e.g. the KFP run id and task name) and the same every time.

    A retried pipeline step computes the same name, finds the job it created before and follows it instead
    of starting a second training.
    """
    clean = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")
    clean = re.sub(r"^[^a-z]+", "", clean) or "habla"
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:10]
    return f"{clean[: MAX_NAME - len(digest) - 1].rstrip('-')}-{digest}"


SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def current_namespace(default: str = "kubeflow", path: str = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """The namespace this pod runs in (a pipeline step launches its job beside itself), else ``default``."""
    try:
        return Path(path).read_text(encoding="utf-8").strip() or default
    except OSError:
        return default


# ------------------------------------------------------------------------------------------ validation


def validate(launch: TrainLaunch) -> None:
    """Raise HablaError (one line) for a launch the cluster would reject or that would leak a secret."""
    if not launch.image or any(c.isspace() for c in launch.image):
        raise HablaError(f"image must be an image reference, got {launch.image!r}")
    if len(launch.name) > MAX_NAME or not _DNS_LABEL.match(launch.name):
        raise HablaError(
            f"job name {launch.name!r} must be lower-case letters, digits and '-', start with a letter and have "
            f"at most {MAX_NAME} characters (habla.launcher.job_name makes one)"
        )
    if not _DNS_LABEL.match(launch.namespace) or len(launch.namespace) > 63:
        raise HablaError(f"namespace {launch.namespace!r} is not a valid Kubernetes namespace name")
    for what, value, low in (("nodes", launch.nodes, 1), ("gpus_per_node", launch.gpus_per_node, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise HablaError(f"{what} must be an integer >= {low}, got {value!r}")
    if launch.nproc_per_node is not None and (not isinstance(launch.nproc_per_node, int) or launch.nproc_per_node < 1):
        raise HablaError(f"nproc_per_node must be an integer >= 1, got {launch.nproc_per_node!r}")
    if launch.gpus_per_node and launch.procs_per_node > launch.gpus_per_node:
        raise HablaError(
            f"nproc_per_node={launch.procs_per_node} is more than gpus_per_node={launch.gpus_per_node}: "
            "each process drives one GPU"
        )
    for what, value in (("cpu", launch.cpu), ("memory", launch.memory)):
        if value is not None and not _QUANTITY.match(str(value)):
            raise HablaError(f"{what} must be a Kubernetes quantity such as '8' or '32Gi', got {value!r}")
    for env_name in launch.env:
        if not _ENV_NAME.match(env_name):
            raise HablaError(f"environment variable name {env_name!r} is not valid")
        if env_name in SECRET_KEYS or _SECRET_LOOKING.search(env_name):
            raise HablaError(
                f"environment variable {env_name} looks like a credential: put it in the Secret "
                f"{launch.s3_secret or DEFAULT_S3_SECRET!r}, never in the job spec"
            )
    if launch.s3_secret is not None and not re.match(r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$", launch.s3_secret):
        raise HablaError(f"secret name {launch.s3_secret!r} is not a valid Kubernetes name")
    if launch.image_pull_policy not in (None, "Always", "IfNotPresent", "Never"):
        raise HablaError(f"image_pull_policy must be Always, IfNotPresent or Never, got {launch.image_pull_policy!r}")
    if not all(isinstance(a, str) for a in launch.train_args):
        raise HablaError("train_args must be strings")


# -------------------------------------------------------------------------------------------- builders


def _env(launch: TrainLaunch) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]  # logs reach the pod log at once
    env += [{"name": k, "value": str(v)} for k, v in sorted(launch.env.items())]
    if launch.s3_secret:
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": launch.s3_secret, "key": key}}} for key in SECRET_KEYS
        ]
    return env


def _resources(launch: TrainLaunch) -> dict[str, dict[str, str]]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if launch.cpu:
        requests["cpu"] = str(launch.cpu)
    if launch.memory:
        requests["memory"] = limits["memory"] = str(launch.memory)
    if launch.gpus_per_node:
        # An extended resource: the scheduler needs it as a limit; a request, if given, must equal it.
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(launch.gpus_per_node)
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def _metadata(launch: TrainLaunch, spec: dict[str, Any]) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "habla", "app.kubernetes.io/component": "train", **launch.labels}
    spec_hash = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "name": launch.name,
        "namespace": launch.namespace,
        "labels": labels,
        "annotations": {SPEC_HASH_ANNOTATION: spec_hash},
    }


def build_trainjob(launch: TrainLaunch) -> dict[str, Any]:
    """A Kubeflow Trainer v2 TrainJob running ``torchrun --no-python habla train ...`` on every node.

    The ``torch-distributed`` runtime sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and
    PET_MASTER_PORT in the trainer container, and torchrun reads PET_* as its flags.
    """
    validate(launch)
    if launch.service_account:
        raise HablaError(
            "a TrainJob's pods take their service account from the training runtime (see manifests/runtimes/); "
            "leave service_account empty or use kind=pytorchjob"
        )
    trainer: dict[str, Any] = {
        "image": launch.image,
        "command": ["torchrun", "--no-python", *TRAIN_COMMAND, *launch.train_args],
        "env": _env(launch),
        "numNodes": launch.nodes,
        "numProcPerNode": launch.procs_per_node,
    }
    resources = _resources(launch)
    if resources:
        trainer["resourcesPerNode"] = resources
    spec = {
        "runtimeRef": {
            "name": launch.runtime,
            "apiGroup": KINDS["trainjob"].group,
            "kind": "ClusterTrainingRuntime",
        },
        "trainer": trainer,
    }
    return {
        "apiVersion": KINDS["trainjob"].api_version,
        "kind": "TrainJob",
        "metadata": _metadata(launch, spec),
        "spec": spec,
    }


def build_pytorchjob(launch: TrainLaunch) -> dict[str, Any]:
    """A Training Operator PyTorchJob: one Master and ``nodes - 1`` Workers, container ``pytorch``.

    The operator sets MASTER_ADDR, MASTER_PORT and RANK (the pod's node rank) in every pod; the command passes
    them to torchrun explicitly (Kubernetes expands ``$(VAR)``), which works with every operator release.
    """
    validate(launch)
    n = launch.procs_per_node
    command = [
        "torchrun",
        f"--nnodes={launch.nodes}",
        f"--nproc-per-node={n}",
        "--node-rank=$(RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "--no-python",
        *TRAIN_COMMAND,
        *launch.train_args,
    ]
    container: dict[str, Any] = {
        "name": "pytorch",
        "image": launch.image,
        "command": command,
        "env": _env(launch),
    }
    if launch.image_pull_policy:
        container["imagePullPolicy"] = launch.image_pull_policy
    resources = _resources(launch)
    if resources:
        container["resources"] = resources
    # DataLoader workers share batches through /dev/shm, which is 64 MiB in a pod unless mounted bigger.
    container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if launch.service_account:
        pod_spec["serviceAccountName"] = launch.service_account
    pod_labels = {"app.kubernetes.io/name": "habla", "app.kubernetes.io/component": "train", **launch.labels}

    def replica(count: int) -> dict[str, Any]:
        # Never restart a pod in place: a static torchrun rendezvous cannot take a lone node back; the job
        # fails, and the pipeline's retry starts it again (training resumes from its checkpoints).
        template = {"metadata": {"labels": pod_labels}, "spec": pod_spec}
        return {"replicas": count, "restartPolicy": "Never", "template": copy.deepcopy(template)}

    replicas = {"Master": replica(1)}
    if launch.nodes > 1:
        replicas["Worker"] = replica(launch.nodes - 1)
    spec = {
        "nprocPerNode": str(n),
        "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 0},
        "pytorchReplicaSpecs": replicas,
    }
    return {
        "apiVersion": KINDS["pytorchjob"].api_version,
        "kind": "PyTorchJob",
        "metadata": _metadata(launch, spec),
        "spec": spec,
    }


def build_job(launch: TrainLaunch, kind: str = "trainjob") -> dict[str, Any]:
    """``build_trainjob`` or ``build_pytorchjob`` by name."""
    if kind == "trainjob":
        return build_trainjob(launch)
    if kind == "pytorchjob":
        return build_pytorchjob(launch)
    raise HablaError(f"kind must be 'trainjob' or 'pytorchjob', got {kind!r}")


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


def _default_log(message: str) -> None:
    print(message, flush=True)


def kubernetes_client(api_client: Any = None) -> Any:
    """An ApiClient: the one given, else in-cluster config when in a pod, else the local kubeconfig."""
    if api_client is not None:
        return api_client
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
    except ImportError:
        raise HablaError("the kubernetes client is missing: pip install 'habla[pipeline]'") from None
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except ConfigException:
        try:
            config.load_kube_config(client_configuration=configuration)
        except (ConfigException, OSError) as exc:
            raise HablaError(
                f"no Kubernetes access: not running in a pod and no usable kubeconfig ({str(exc).splitlines()[0]})"
            ) from None
    return client.ApiClient(configuration)


def _api_message(exc: Any) -> str:
    """The API server's one-line message from an ApiException (its Status body), without headers."""
    try:
        message = json.loads(exc.body).get("message") or ""
    except (TypeError, ValueError, AttributeError):
        message = ""
    message = message or str(getattr(exc, "reason", "") or "")
    return " ".join(message.split())[:400]


def _api_error(exc: Any, kind: JobKind, verb: str, namespace: str) -> HablaError:
    status = getattr(exc, "status", None)
    where = f"{kind.plural}.{kind.group} in namespace {namespace}"
    if status in (401, 403):
        return HablaError(
            f"not allowed to {verb} {where} (HTTP {status}): apply manifests/ (kubectl apply -k "
            "manifests/overlays/<overlay>) and run the step under a service account bound to habla-launcher"
        )
    if status == 404 and verb == "create":
        return HablaError(
            f"{kind.api_version} {kind.plural} not found in namespace {namespace}: is {kind.installs_with} "
            f"installed and does the namespace exist? ({_api_message(exc)})"
        )
    if status in (400, 422):
        return HablaError(f"the cluster rejected the {kind.kind}: {_api_message(exc)}")
    return HablaError(f"Kubernetes API error on {verb} {where}: HTTP {status} {_api_message(exc)}")


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: throttling, a 5xx, or no HTTP answer at all (connection refused or reset)."""
    status = getattr(exc, "status", None)
    return status is None or status == 429 or status >= 500


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
            if _is_transient(exc):
                raise
            raise _api_error(exc, self.kind, "get", self.namespace) from None

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
    log: Log = _default_log,
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
    ours = True  # whether the job under this name is this step's to clean up
    try:
        with _sigterm_as_interrupt():
            try:
                _create_or_adopt(cluster, body, log, poll_s)
            except HablaError:
                ours = False  # nothing was created, or the job of that name belongs to something else
                raise
            return _follow(cluster, name, log, poll_s, timeout_s, log_tail_lines)
    except KeyboardInterrupt:
        log(f"{jk.kind} {name}: interrupted")
        raise
    finally:
        if ours and keep:
            log(f"{jk.kind} {name}: kept (kubectl delete {jk.plural}.{jk.group} -n {namespace} {name})")
        elif ours:
            _delete_quietly(cluster, name, log)


def _create_or_adopt(cluster: _Cluster, body: dict[str, Any], log: Log, poll_s: float) -> None:
    """Create the job; if one of that name exists, adopt it (same spec) or replace it (it had failed)."""
    jk, ns = cluster.kind, cluster.namespace
    name = body["metadata"]["name"]
    wanted_hash = body["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    deadline = time.monotonic() + max(120.0, 10 * poll_s)  # how long a replaced job may take to go away
    while True:
        try:
            cluster.create(body)
            log(f"{jk.kind} {name}: created")
            return
        except cluster.ApiException as exc:
            if exc.status != 409:
                raise _api_error(exc, jk, "create", ns) from None
        except cluster.errors as exc:
            raise HablaError(f"cannot reach the Kubernetes API to create {jk.kind} {name}: {_brief(exc)}") from None
        if time.monotonic() > deadline:
            raise HablaError(f"{jk.kind} {ns}/{name} exists but could not be adopted or replaced; try again later")
        existing = cluster.get(name)
        if existing is None:
            continue  # deleted in between: create it again
        meta = existing.get("metadata") or {}
        if meta.get("deletionTimestamp"):  # a replaced job on its way out
            time.sleep(poll_s)
            continue
        if (meta.get("annotations") or {}).get(SPEC_HASH_ANNOTATION) != wanted_hash:
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
        return


def _brief(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


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
            if errors > 5:
                raise HablaError(
                    f"lost contact with the Kubernetes API following {jk.kind} {name}: {_brief(exc)}"
                ) from None
            log(f"{jk.kind} {name}: API error ({_brief(exc)}), retrying")
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
        log(
            f"{jk.kind} {name}: could not delete it ({_brief(exc)}); delete it by hand: "
            f"kubectl delete {jk.plural}.{jk.group} -n {cluster.namespace} {name}"
        )


# ------------------------------------------------------------------------------------------------ local

# Variables of an enclosing distributed job that would confuse the torchrun started here.
_DIST_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_commands(
    nproc_per_node: int,
    nnodes: int = 1,
    program: Sequence[str] = LOCAL_PROGRAM,
    train_args: Sequence[str] = (),
    port: int | None = None,
) -> list[list[str]]:
    """The torchrun command line(s) run_local starts: one, or one per simulated node on loopback."""
    base = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        return [[*base, "--standalone", "--nnodes=1", f"--nproc-per-node={nproc_per_node}", *program, *train_args]]
    port = port or _free_port()
    return [
        [
            *base,
            f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc_per_node}",
            f"--node-rank={rank}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            *program,
            *train_args,
        ]
        for rank in range(nnodes)
    ]


def run_local(
    train_args: Sequence[str],
    *,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    program: Sequence[str] = LOCAL_PROGRAM,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    log: Log = _default_log,
) -> None:
    """Run ``habla train <train_args>`` under torchrun on this machine and stream its output to ``log``.

    ``nnodes > 1`` starts one torchrun per node on the loopback interface (static rendezvous), the way a
    cluster runs them; each line is prefixed with its node. On CPU, torch.distributed uses gloo. ``program``
    replaces ``-m habla.cli train`` (tests use a small script). Raises HablaError on a non-zero exit or timeout.
    """
    for what, value in (("nproc_per_node", nproc_per_node), ("nnodes", nnodes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HablaError(f"{what} must be an integer >= 1, got {value!r}")
    if importlib.util.find_spec("torch") is None:
        raise HablaError("training here needs torch: pip install 'habla[train]'")
    child_env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS and not k.startswith("PET_")}
    child_env.update(env or {})
    child_env["PYTHONUNBUFFERED"] = "1"
    commands = torchrun_commands(nproc_per_node, nnodes, program, list(train_args))
    log(f"torchrun: {nnodes} node(s) x {nproc_per_node} process(es) on this machine")
    procs: list[subprocess.Popen[str]] = []
    readers: list[threading.Thread] = []
    try:
        for rank, command in enumerate(commands):
            proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                env=child_env,
                start_new_session=True,  # its own process group: stop all its workers at once
            )
            procs.append(proc)
            prefix = f"[node {rank}] " if nnodes > 1 else ""
            reader = threading.Thread(target=_pump, args=(proc, prefix, log), daemon=True)
            reader.start()
            readers.append(reader)
        failed = _wait_all(procs, timeout_s)
    except BaseException:
        _stop(procs)
        raise
    finally:
        for reader in readers:
            reader.join(timeout=5)
    if failed == "timeout":
        raise HablaError(f"training under torchrun did not finish within {timeout_s:.0f} s")
    if failed is not None:
        raise HablaError(f"training under torchrun failed (exit code {failed}); its output is above")


def _pump(proc: subprocess.Popen[str], prefix: str, log: Log) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        log(prefix + line.rstrip("\n"))


def _wait_all(procs: list[subprocess.Popen[str]], timeout_s: float | None) -> int | str | None:
    """Wait for every process; on the first failure stop the rest. The failing exit code, 'timeout' or None."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in procs]
        bad = [c for c in codes if c not in (None, 0)]
        if bad:
            _stop(procs)
            return bad[0]
        if all(c == 0 for c in codes):
            return None
        if deadline is not None and time.monotonic() > deadline:
            _stop(procs)
            return "timeout"
        time.sleep(0.1)


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    """SIGTERM each torchrun's process group (torchrun forwards it to its workers), then SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
