"""Kubernetes job specs for ``habla train`` on N nodes x G processes: a Kubeflow Trainer v2 ``TrainJob`` or a
Training Operator ``PyTorchJob``, built from a :class:`TrainLaunch` and checked before anything is sent.

Plain functions, no KFP and no API calls (habla.kubeflow.follow creates and follows the jobs). Credentials
never pass through here: the job reads them from a Kubernetes Secret (``secretKeyRef``), so no secret value
can appear in a job spec, a compiled pipeline or a log.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from habla.core.errors import HablaError
from habla.runs.parameters import DEFAULT_RUNTIME, QUANTITY

Log = Callable[[str], None]


def print_log(message: str) -> None:
    """The default log of the launchers: a line on stdout, flushed (pod logs show it at once)."""
    print(message, flush=True)


DEFAULT_S3_SECRET = "habla-s3-credentials"
# Keys of that Secret, each exported under its own name (boto3 and NeMo's S3 reader read them).
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# The ClusterTrainingRuntime of habla's TrainJobs (manifests/runtimes/): Trainer's stock torch-distributed plus a
# RAM-backed /dev/shm for DataLoader workers (64 MiB otherwise), and it is not installed by Trainer's Helm chart.
TRAIN_COMMAND = ("habla", "train")  # the console script, as installed in the images
LOCAL_PROGRAM = ("-m", "habla.cli", "train")  # the same, run by this Python (no PATH lookup)
PLAN_ANNOTATION = "habla.dev/plan"  # the run's plan in brief (habla launch), as compact JSON
SPEC_HASH_ANNOTATION = "habla.dev/spec-hash"  # habla's own domain, as its Lease annotations (not kubeflow.org's)
OLD_SPEC_HASH_ANNOTATION = "habla.kubeflow.org/spec-hash"  # what jobs created before 0.2 carry: still adopted
# Istio's opt-out, as a label (what Istio's injector reads first) and an annotation (what KFP sets on its own pods:
# kubeflow/pipelines backend/src/common/util/consts.go AnnotationKeyIstioSidecarInject). A sidecar in a training
# pod keeps the pod from completing and sits in the torchrun rendezvous; the profile namespaces of multi-user
# Kubeflow inject one into every pod that does not opt out.
NO_ISTIO_SIDECAR = {"sidecar.istio.io/inject": "false"}
# The RAM-backed /dev/shm of training pods: its most, so that it cannot take the node's memory (it counts against
# the pod's memory limit). PyTorch's DataLoader workers pass batches through it: 8 workers x 2 prefetched batches x
# 8 processes of a node, at some 40 MB a batch of audio, is about 5 GB.
SHM_SIZE = "16Gi"
# NCCL's own defaults, unless the launch sets them: warnings (a failed collective names its cause) in the pod log
# the launcher copies when the job fails.
NCCL_DEFAULTS = {"NCCL_DEBUG": "WARN"}
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

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Label keys and values as the API server checks them (k8s.io/apimachinery validation.IsQualifiedName,
# IsValidLabelValue): an optional DNS-subdomain prefix and "/", a name of at most 63 characters.
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def label_problem(key: str, value: str) -> str | None:
    """Why the API server would refuse the label ``key=value``, or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f"label {key!r}: its prefix must be a DNS subdomain of at most 253 characters"
    if not name or not _LABEL_NAME.match(name):
        return f"label {key!r}: a name of 1-63 letters, digits, '-', '_' or '.', starting and ending alphanumeric"
    if not isinstance(value, str) or not _LABEL_NAME.match(value):
        return (
            f"label {key}={value!r}: a value of at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends"
        )
    return None


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
    # PyTorchJob pods only (a TrainJob's pods take them from its runtime, manifests/runtimes):
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    priority_class: str = ""
    # The object the job belongs to (an ownerReference: apiVersion, kind, name, uid), e.g. the launcher's pod:
    # when it is deleted, Kubernetes' garbage collector deletes the job and frees its GPUs.
    owner: Mapping[str, str] | None = None
    disruption_budget: bool = True  # a PodDisruptionBudget keeps node drains from evicting the gang's pods
    annotations: Mapping[str, str] = field(default_factory=dict)  # the job's, beside habla's spec hash

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1


def plan_annotation(plan: dict) -> str:
    """The figures of a run's plan (``habla train --dry-run``) a person looking at the job wants first."""
    brief = {section: plan[section] for section in ("world", "batch", "learning_rate", "schedule", "cadence", "node")}
    return json.dumps(brief, separators=(",", ":"), sort_keys=True)


def job_name(*parts: str, prefix: str = "habla-train") -> str:
    """A DNS-1035 label unique to ``parts`` (e.g. the KFP run id and task name) and the same every time.

    A retried pipeline step computes the same name, finds the job it created before and follows it instead
    of starting a second training.
    """
    clean = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")
    clean = re.sub(r"^[^a-z]+", "", clean) or "habla"
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:10]
    return f"{clean[: MAX_NAME - len(digest) - 1].rstrip('-')}-{digest}"


# ------------------------------------------------------------------------------------------ validation


def validate(launch: TrainLaunch) -> None:
    """Raise HablaError (one line) for a launch the cluster would reject or that would leak a secret."""
    if not launch.image or any(c.isspace() for c in launch.image):
        raise HablaError(f"image must be an image reference, got {launch.image!r}")
    if len(launch.name) > MAX_NAME or not _DNS_LABEL.match(launch.name):
        raise HablaError(
            f"job name {launch.name!r} must be lower-case letters, digits and '-', start with a letter and have "
            f"at most {MAX_NAME} characters (habla.kubeflow.jobs.job_name makes one)"
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
        if value is not None and not QUANTITY.match(str(value)):
            raise HablaError(f"{what} must be a Kubernetes quantity such as '8' or '32Gi', got {value!r}")
    for key, value in launch.labels.items():
        if (problem := label_problem(key, value)) is not None:
            raise HablaError(problem)
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
    if launch.priority_class and not _DNS_SUBDOMAIN.match(launch.priority_class):
        raise HablaError(f"priority class {launch.priority_class!r} is not a valid Kubernetes name")
    for key, value in launch.node_selector.items():
        if (problem := label_problem(key, value)) is not None:
            raise HablaError(f"node selector: {problem}")
    if launch.owner is not None and set(launch.owner) != {"apiVersion", "kind", "name", "uid"}:
        raise HablaError("owner must name apiVersion, kind, name and uid")


# -------------------------------------------------------------------------------------------- builders


def _env(launch: TrainLaunch) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]  # logs reach the pod log at once
    env += [{"name": k, "value": str(v)} for k, v in sorted({**NCCL_DEFAULTS, **launch.env}.items())]
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
    meta: dict[str, Any] = {
        "name": launch.name,
        "namespace": launch.namespace,
        "labels": labels,
        "annotations": {**launch.annotations, SPEC_HASH_ANNOTATION: spec_hash},
    }
    if launch.owner:
        meta["ownerReferences"] = [owner_reference(launch.owner)]
    return meta


def owner_reference(owner: Mapping[str, str]) -> dict[str, Any]:
    """An ownerReference to ``owner``: deleting it deletes the owned object (never blocks the owner's deletion,
    which would take the right to set finalizers on it)."""
    return {**{k: owner[k] for k in ("apiVersion", "kind", "name", "uid")}, "blockOwnerDeletion": False}


def spec_hash(job: Mapping[str, Any]) -> str | None:
    """The spec hash a job was created with (also under the annotation key of earlier habla releases)."""
    annotations = (job.get("metadata") or {}).get("annotations") or {}
    return annotations.get(SPEC_HASH_ANNOTATION) or annotations.get(OLD_SPEC_HASH_ANNOTATION)


def build_disruption_budget(launch: TrainLaunch, kind: str, job_uid: str) -> dict[str, Any]:
    """A PodDisruptionBudget that lets no voluntary disruption (a node drain, the cluster autoscaler) evict one
    of the job's pods: a gang job loses all its nodes' work when one pod goes. It belongs to the job (deleted
    with it). A drain waits until the job ends; an involuntary failure is still the pipeline's retry's to mend."""
    jk = KINDS[kind]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            # Named after this job's uid too: the budget of a failed job replaced under the same name may not be
            # garbage-collected yet, and a name clash would leave the new job without one.
            "name": f"{launch.name}-{hashlib.sha256(job_uid.encode()).hexdigest()[:8]}",
            "namespace": launch.namespace,
            "labels": {"app.kubernetes.io/name": "habla", "app.kubernetes.io/component": "train"},
            "ownerReferences": [
                owner_reference({"apiVersion": jk.api_version, "kind": jk.kind, "name": launch.name, "uid": job_uid})
            ],  # fmt: skip
        },
        "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {jk.pod_label: launch.name}}},
    }


def build_trainjob(launch: TrainLaunch) -> dict[str, Any]:
    """A Kubeflow Trainer v2 TrainJob running ``torchrun --no-python habla train ...`` on every node.

    The runtime (``habla-torch-distributed``, or Trainer's ``torch-distributed``) sets PET_NNODES,
    PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT in the trainer container, and torchrun
    reads PET_* as its flags.
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
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}}],
    }
    if launch.service_account:
        pod_spec["serviceAccountName"] = launch.service_account
    if launch.node_selector:
        pod_spec["nodeSelector"] = dict(launch.node_selector)
    if launch.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in launch.tolerations]
    if launch.priority_class:
        pod_spec["priorityClassName"] = launch.priority_class
    pod_labels = {"app.kubernetes.io/name": "habla", "app.kubernetes.io/component": "train", **launch.labels,
                  **NO_ISTIO_SIDECAR}  # fmt: skip

    def replica(count: int) -> dict[str, Any]:
        # Never restart a pod in place: a static torchrun rendezvous cannot take a lone node back; the job
        # fails, and the pipeline's retry starts it again (training resumes from its checkpoints).
        template = {"metadata": {"labels": pod_labels, "annotations": dict(NO_ISTIO_SIDECAR)}, "spec": pod_spec}
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
