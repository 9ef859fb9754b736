"""The pipeline's cluster training step: a TrainJob or PyTorchJob named after the KFP run and task, whose pods
get the run's resources and placement (:class:`TrainPods`) and which belongs to the step's own pod
(:func:`own_pod`), created and followed by habla.kubeflow.follow.run_on_cluster."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from habla.core.errors import HablaError, one_line
from habla.kubeflow import jobs
from habla.kubeflow.api import IN_CLUSTER_NAMESPACE, current_namespace, kubernetes_client
from habla.kubeflow.follow import run_on_cluster
from habla.kubeflow.jobs import TrainLaunch, print_log
from habla.runs.parameters import AUTO, RunParameters, default_of, gpu_count
from habla.training.command import TrainStep, plan_lines

REQUEST_TIMEOUT = 60  # seconds: reading the pod must not hang the step


def train_on_cluster(
    step: TrainStep,
    nodes: int,
    gpus_per_node: str,
    kind: str,
    runtime: str,
    image: str,
    job_id: str,
    task_name: str,
    pods: TrainPods | None = None,
    plan: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, float]]:
    """The pipeline's training step as a TrainJob (``kind`` ``trainjob``, on the ClusterTrainingRuntime
    ``runtime``) or a PyTorchJob of ``nodes`` × GPUs, named after the KFP run and task (a retried step adopts
    the job it started). The job's pods run ``habla train`` in ``image`` with this pod's S3 endpoint and region
    (credentials from the Secret), and ``pods``' resources and placement; the job belongs to this pod (deleted
    with it); ``auto`` requests come from the run's ``plan`` (:func:`plan_training`). Returns the model's URI and
    the training numbers."""
    import os

    pods = (pods or TrainPods.defaults()).planned(plan)
    launch = TrainLaunch(
        image=image,
        name=jobs.job_name(job_id, task_name),
        train_args=tuple(step.arguments()),
        namespace=current_namespace(),
        nodes=nodes,
        gpus_per_node=gpu_count(gpus_per_node),
        cpu=pods.cpu,
        memory=pods.memory,
        runtime=runtime,
        env={k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION") if os.environ.get(k)},
        node_selector=dict(pods.node_selector),
        tolerations=tuple(pods.tolerations),
        priority_class=pods.priority_class,
        owner=own_pod(),
    )
    run_on_cluster(launch, kind)
    return step.result()


def plan_training(step: TrainStep, nodes: int, gpus_per_node: str) -> dict:
    """The run's plan on ``nodes`` × ``gpus_per_node`` (``habla train --dry-run``), logged line by line before
    the job is created: a plan habla train would refuse fails the pipeline here, before a GPU is requested."""
    plan = step.inputs.plan(nodes, gpu_count(gpus_per_node))
    for line in plan_lines(plan):
        print_log(line)
    return plan


@dataclass(frozen=True)
class TrainPods:
    """What the training job's pods ask of the cluster, from the pipeline's parameters (RunParameters):
    CPU and memory per pod, and where GPU pods may go."""

    cpu: str
    memory: str
    node_selector: Mapping[str, str]
    tolerations: tuple[Mapping[str, Any], ...]
    priority_class: str = ""

    def planned(self, plan: Mapping[str, Any] | None) -> TrainPods:
        """These requests with ``auto`` CPU or memory taken from the node request of the run's ``plan``."""
        node = (plan or {}).get("node") or {}
        resolved = {"cpu": str(node.get("cpu", "")), "memory": str(node.get("memory", ""))}
        for name in ("cpu", "memory"):
            if getattr(self, name) == AUTO and not resolved[name]:
                raise HablaError(f"train_{name}=auto needs the run's plan, which names no node {name}")
        return dataclasses.replace(self, **{k: v for k, v in resolved.items() if getattr(self, k) == AUTO})

    @classmethod
    def defaults(cls) -> TrainPods:
        p = {f.name: f for f in dataclasses.fields(RunParameters)}
        value = {name: default_of(p[name]) for name in ("train_cpu", "train_memory", "gpu_node_selector",
                                                        "gpu_tolerations", "priority_class")}  # fmt: skip
        return cls(value["train_cpu"], value["train_memory"], value["gpu_node_selector"],
                   tuple(value["gpu_tolerations"]), value["priority_class"])  # fmt: skip


def own_pod(api_client: Any = None) -> dict[str, str] | None:
    """This process's pod as an owner (apiVersion, kind, name, uid), or None outside a pod or when it cannot be
    read (then the job has no owner: it is still deleted by the step's own clean-up)."""
    import os

    name = os.environ.get("HOSTNAME", "")  # a pod's hostname is its name (unless spec.hostname says otherwise)
    if not name or not IN_CLUSTER_NAMESPACE.exists():
        return None
    try:
        from kubernetes import client

        pod = client.CoreV1Api(kubernetes_client(api_client)).read_namespaced_pod(
            name, current_namespace(), _request_timeout=REQUEST_TIMEOUT
        )
    except Exception as exc:  # noqa: BLE001 - an owner is a safety net, never a reason to fail the step
        print_log(f"the training job gets no owner: cannot read this pod ({one_line(exc, first_line=True)})")
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": pod.metadata.name, "uid": pod.metadata.uid}
