"""habla.kubeflow.jobs: the generated TrainJob/PyTorchJob field by field, and bad launches refused."""

from __future__ import annotations

import re

import pytest
from fixtures.cluster import env_map, make_launch

from habla.core.errors import HablaError
from habla.kubeflow import api, jobs
from habla.kubeflow.jobs import build_pytorchjob, build_trainjob, job_name

# ------------------------------------------------------------------------------------------- builders


def test_trainjob_fields():
    launch = make_launch()
    job = build_trainjob(launch)
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    meta = job["metadata"]
    assert meta["name"] == launch.name and meta["namespace"] == "team-asr"
    assert meta["labels"]["app.kubernetes.io/name"] == "habla"
    assert meta["labels"]["pipelines.kubeflow.org/run"] == "run-123"
    assert re.fullmatch(r"[0-9a-f]{16}", meta["annotations"][jobs.SPEC_HASH_ANNOTATION])
    spec = job["spec"]
    assert spec["runtimeRef"] == {
        "name": "habla-torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    trainer = spec["trainer"]
    assert trainer["image"] == launch.image
    assert trainer["command"] == ["torchrun", "--no-python", "habla", "train", *launch.train_args]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4
    assert trainer["resourcesPerNode"] == {
        "requests": {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "4"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "4"},
    }
    env = env_map(trainer["env"])
    assert env["AWS_ENDPOINT_URL"] == {
        "name": "AWS_ENDPOINT_URL",
        "value": "http://minio-service.kubeflow:9000",
    }
    assert env["AWS_REGION"]["value"] == "us-east-1"
    assert env["PYTHONUNBUFFERED"]["value"] == "1"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": "habla-s3-credentials", "key": key}},
        }
    # torchrun takes its topology from the runtime's PET_* variables: the launcher must not set them.
    assert not [name for name in env if name.startswith("PET_")]


def test_trainjob_cpu_only_and_custom_runtime():
    job = build_trainjob(make_launch(gpus_per_node=0, nproc_per_node=2, cpu=None, memory=None, runtime="habla-torch"))
    trainer = job["spec"]["trainer"]
    assert trainer["numProcPerNode"] == 2
    assert "resourcesPerNode" not in trainer
    assert job["spec"]["runtimeRef"]["name"] == "habla-torch"


def test_pytorchjob_fields():
    launch = make_launch(nodes=3, service_account="habla-train", image_pull_policy="IfNotPresent")
    job = build_pytorchjob(launch)
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    spec = job["spec"]
    assert spec["nprocPerNode"] == "4"
    assert spec["runPolicy"] == {"cleanPodPolicy": "None", "backoffLimit": 0}
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    for rtype in ("Master", "Worker"):
        replica = replicas[rtype]
        assert replica["restartPolicy"] == "Never"
        pod = replica["template"]["spec"]
        assert pod["serviceAccountName"] == "habla-train"
        assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": jobs.SHM_SIZE}}]
        # Istio's opt-out, as KFP puts it on its own pods (annotation) and as Istio reads it first (label)
        assert replica["template"]["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
        assert replica["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"  # the operator finds its container by this name
        assert container["image"] == launch.image and container["imagePullPolicy"] == "IfNotPresent"
        assert container["command"] == [
            "torchrun",
            "--nnodes=3",
            "--nproc-per-node=4",
            "--node-rank=$(RANK)",
            "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)",
            "--no-python",
            "habla",
            "train",
            *launch.train_args,
        ]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
        assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
        env = env_map(container["env"])
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "habla-s3-credentials",
            "key": "AWS_SECRET_ACCESS_KEY",
        }
        assert replica["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "train"
    # Replicas are separate objects (no shared dicts: YAML output without anchors, no aliasing on edits).
    assert replicas["Master"]["template"] is not replicas["Worker"]["template"]


def test_pytorchjob_single_node_has_no_workers_and_no_secret_without_one():
    job = build_pytorchjob(make_launch(nodes=1, s3_secret=None))
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    env = env_map(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"])
    assert "AWS_ACCESS_KEY_ID" not in env


def test_spec_hash_follows_the_spec():
    a = build_trainjob(make_launch())["metadata"]["annotations"]
    b = build_trainjob(make_launch())["metadata"]["annotations"]
    c = build_trainjob(make_launch(nodes=4))["metadata"]["annotations"]
    assert a == b and a != c


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "Train_Job"}, "job name"),
        ({"name": "x" * 41}, "job name"),
        ({"image": ""}, "image"),
        ({"namespace": "Team"}, "namespace"),
        ({"nodes": 0}, "nodes"),
        ({"gpus_per_node": -1}, "gpus_per_node"),
        ({"gpus_per_node": 2, "nproc_per_node": 4}, "more than gpus_per_node"),
        ({"memory": "lots"}, "quantity"),
        ({"env": {"WANDB_API_KEY": "x"}}, "looks like a credential"),
        ({"env": {"AWS_SECRET_ACCESS_KEY": "x"}}, "looks like a credential"),
        ({"env": {"1BAD": "x"}}, "not valid"),
        ({"image_pull_policy": "Sometimes"}, "image_pull_policy"),
        ({"s3_secret": "Bad Secret"}, "secret name"),
    ],
)
def test_bad_input_is_one_line_habla_error(overrides, message):
    with pytest.raises(HablaError, match=message) as info:
        build_pytorchjob(make_launch(**overrides))
    assert "\n" not in str(info.value)


def test_trainjob_refuses_a_pod_service_account():
    with pytest.raises(HablaError, match="runtime"):
        build_trainjob(make_launch(service_account="sa"))


def test_unknown_kind():
    with pytest.raises(HablaError, match="trainjob"):
        jobs.build_job(make_launch(), "mpijob")


def test_job_name_is_deterministic_and_a_dns_label():
    a = job_name("3f2a-run", "train-model")
    assert a == job_name("3f2a-run", "train-model")
    assert a != job_name("3f2a-run", "train-model-2")
    assert job_name("a", "bc") != job_name("ab", "c")
    for name in (a, job_name("x", prefix="9 Weird_Prefix!" * 5), job_name(prefix="---")):
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= jobs.MAX_NAME, name


def test_current_namespace(tmp_path):
    assert api.current_namespace("dflt", path=str(tmp_path / "absent")) == "dflt"
    (tmp_path / "namespace").write_text("kubeflow-user-example-com\n")
    assert api.current_namespace(path=str(tmp_path / "namespace")) == "kubeflow-user-example-com"
