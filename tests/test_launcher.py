"""habla.launcher: the generated TrainJob/PyTorchJob field by field, the status-following logic against a
stand-in Kubernetes API on 127.0.0.1 (no cluster can run here), and torchrun on this machine."""

from __future__ import annotations

import json
import os
import re
import signal
import textwrap

import pytest
from k8s_standin import StandinK8s  # tests/ is on sys.path (pytest's default import mode)

from habla import launcher
from habla.errors import HablaError
from habla.launcher import TrainLaunch, build_pytorchjob, build_trainjob, job_name, job_state, run_on_cluster

SECRET_VALUE = "wJalrXUtnFEMI-not-a-real-secret-K7MDENG"


def make_launch(**overrides) -> TrainLaunch:
    fields = {
        "image": "registry.example.com/habla-train:0.1.0",
        "name": job_name("run-123", "train"),
        "train_args": ("--data", "s3://bucket/run/data", "--out", "s3://bucket/run/model", "--nodes", "2"),
        "namespace": "team-asr",
        "nodes": 2,
        "gpus_per_node": 4,
        "cpu": "16",
        "memory": "64Gi",
        "env": {"AWS_ENDPOINT_URL": "http://minio-service.kubeflow:9000", "AWS_REGION": "us-east-1"},
        "labels": {"pipelines.kubeflow.org/run": "run-123"},
    }
    fields.update(overrides)
    return TrainLaunch(**fields)


def env_map(env: list[dict]) -> dict[str, dict]:
    return {e["name"]: e for e in env}


# ------------------------------------------------------------------------------------------- builders


def test_trainjob_fields():
    launch = make_launch()
    job = build_trainjob(launch)
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    meta = job["metadata"]
    assert meta["name"] == launch.name and meta["namespace"] == "team-asr"
    assert meta["labels"]["app.kubernetes.io/name"] == "habla"
    assert meta["labels"]["pipelines.kubeflow.org/run"] == "run-123"
    assert re.fullmatch(r"[0-9a-f]{16}", meta["annotations"][launcher.SPEC_HASH_ANNOTATION])
    spec = job["spec"]
    assert spec["runtimeRef"] == {
        "name": "torch-distributed",
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
        assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
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
        launcher.build_job(make_launch(), "mpijob")


def test_job_name_is_deterministic_and_a_dns_label():
    a = job_name("3f2a-run", "train-model")
    assert a == job_name("3f2a-run", "train-model")
    assert a != job_name("3f2a-run", "train-model-2")
    assert job_name("a", "bc") != job_name("ab", "c")
    for name in (a, job_name("x", prefix="9 Weird_Prefix!" * 5), job_name(prefix="---")):
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= launcher.MAX_NAME, name


def test_current_namespace(tmp_path):
    assert launcher.current_namespace("dflt", path=str(tmp_path / "absent")) == "dflt"
    (tmp_path / "namespace").write_text("kubeflow-user-example-com\n")
    assert launcher.current_namespace(path=str(tmp_path / "namespace")) == "kubeflow-user-example-com"


def test_job_state_reads_both_kinds():
    def cond(t, status="True", **kw):
        return {"type": t, "status": status, **kw}

    assert job_state({}).phase == "pending"
    assert job_state({"status": {"conditions": [cond("Complete", reason="JobSetCompleted")]}}).phase == "succeeded"
    running = job_state({"status": {"conditions": [cond("Created", "False"), cond("Running", message="up")]}})
    assert running.phase == "running" and running.summary == "Running: up"
    failed = job_state({"status": {"conditions": [cond("Running", "False"), cond("Failed", reason="BackoffLimit")]}})
    assert failed.phase == "failed" and failed.summary.startswith("Failed (BackoffLimit)")
    trainjob = job_state({"status": {"jobsStatus": [{"name": "node", "active": 2, "ready": 2}]}})
    assert trainjob.phase == "running" and trainjob.summary == "node: 2 active, 2 ready"
    replica = job_state({"status": {"replicaStatuses": {"Master": {"active": 1}, "Worker": {"succeeded": 1}}}})
    assert replica.summary == "Master: 1 active; Worker: 1 succeeded"


# -------------------------------------------------------------------------------- the stand-in cluster


def run(api: StandinK8s, launch: TrainLaunch, kind: str, lines: list[str], **kwargs):
    return run_on_cluster(launch, kind, poll_s=0.01, log=lines.append, api_client=api.api_client(), **kwargs)


@pytest.mark.parametrize(
    ("kind", "plural", "steps", "final"),
    [
        ("trainjob", "trainjobs", ["", "", "Complete"], "Complete"),
        ("pytorchjob", "pytorchjobs", ["Created", "Running", "Running", "Succeeded"], "Succeeded"),
    ],
)
def test_success_creates_follows_and_deletes(kind, plural, steps, final):
    launch = make_launch()
    lines: list[str] = []
    with StandinK8s(steps=steps) as api:
        status = run(api, launch, kind, lines)
        (post,) = api.calls("POST", plural)
        assert post.path == f"/apis/{launcher.KINDS[kind].api_version}/namespaces/team-asr/{plural}"
        assert post.body == launcher.build_job(launch, kind)  # exactly what the builder made
        (delete,) = api.calls("DELETE", plural)
        assert delete.path.endswith(f"/{plural}/{launch.name}")
        assert delete.query["propagationPolicy"] == ["Background"]
        assert api.objects == {}
        pod_lists = api.calls("GET", "pods")
        assert pod_lists and pod_lists[0].query["labelSelector"] == [f"{launcher.KINDS[kind].pod_label}={launch.name}"]
    assert status["conditions"][-1]["type"] == final
    text = "\n".join(lines)
    assert "created" in text and "succeeded after" in text and "deleted" in text
    assert "pods 2 Pending" in text and "pods 2 Succeeded" in text
    if kind == "pytorchjob":  # each state change is logged once
        assert sum("Running (JobRunning)" in line for line in lines) == 1


def test_failure_raises_shows_pod_log_and_cleans_up():
    launch = make_launch()
    lines: list[str] = []
    with StandinK8s(steps=["Created", "Running", "Failed"]) as api:
        with pytest.raises(HablaError, match=r"PyTorchJob team-asr/habla-train-\w+ failed: Failed") as info:
            run(api, launch, "pytorchjob", lines)
        assert api.calls("DELETE") and api.objects == {}
        (log_call,) = api.calls("GET", "log")  # only the failed pod's log is read
        assert "-node-0/log" in log_call.path and log_call.query["tailLines"] == ["50"]
    assert "\n" not in str(info.value)
    assert "    RuntimeError: CUDA out of memory" in lines


def test_retried_step_adopts_its_running_job():
    launch = make_launch()
    lines: list[str] = []
    with StandinK8s(steps=["Created", "Running", "Succeeded"]) as api:
        api.put("trainjobs", "team-asr", build_trainjob(launch), step=2)  # the first attempt's job, running
        run(api, launch, "trainjob", lines)
        assert len(api.calls("POST")) == 1  # answered 409: no second job
        assert len(api.calls("DELETE")) == 1 and api.objects == {}
    assert any("earlier attempt of this step; following it" in line for line in lines)
    assert not any(line.endswith(": created") for line in lines)


def test_retried_step_replaces_a_failed_job():
    launch = make_launch()
    lines: list[str] = []
    with StandinK8s(steps=["Created", "Running", "Succeeded"]) as api:
        failed = {"conditions": [{"type": "Failed", "status": "True", "reason": "JobFailed", "message": "node died"}]}
        api.put("trainjobs", "team-asr", build_trainjob(launch), status=failed)
        run(api, launch, "trainjob", lines)
        assert len(api.calls("POST")) == 2  # 409, then the new job
        assert len(api.calls("DELETE")) == 2  # the failed job, then the finished one
    assert any("an earlier attempt failed" in line for line in lines)


def test_existing_job_with_another_spec_is_not_touched():
    with StandinK8s() as api:
        api.put("trainjobs", "team-asr", build_trainjob(make_launch(nodes=4)))
        with pytest.raises(HablaError, match="already exists with a different spec"):
            run(api, make_launch(), "trainjob", [])
        assert not api.calls("DELETE") and len(api.objects) == 1


def test_keep_leaves_the_job():
    lines: list[str] = []
    with StandinK8s(steps=["Created", "Succeeded"]) as api:
        run(api, make_launch(), "pytorchjob", lines, keep=True)
        assert not api.calls("DELETE") and len(api.objects) == 1
    assert any("kept (kubectl delete pytorchjobs.kubeflow.org" in line for line in lines)


def test_timeout_raises_and_cleans_up():
    with StandinK8s(steps=["Created", "Running"]) as api:
        with pytest.raises(HablaError, match="did not finish within 0 s"):
            run(api, make_launch(), "pytorchjob", [], timeout_s=0.05)
        assert api.calls("DELETE") and api.objects == {}


def test_transient_api_errors_are_retried():
    lines: list[str] = []
    with StandinK8s(steps=["Created", "Succeeded"], flaky_gets=2) as api:
        run(api, make_launch(), "pytorchjob", lines)
    assert sum("API error" in line for line in lines) == 2


def test_missing_crd_and_missing_rbac_are_one_line_errors():
    forbidden = r"not allowed to create pytorchjobs.kubeflow.org .*HTTP 403"
    with (
        StandinK8s(missing={"trainjobs"}) as api,
        pytest.raises(HablaError, match="Kubeflow Trainer v2 installed"),
    ):
        run(api, make_launch(), "trainjob", [])
    with StandinK8s(forbidden={"pytorchjobs"}) as api:
        with pytest.raises(HablaError, match=forbidden) as info:
            run(api, make_launch(), "pytorchjob", [])
        assert not api.calls("DELETE")  # nothing was created: nothing to clean up
    assert "\n" not in str(info.value)


def test_no_kubernetes_access_is_a_habla_error(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    with pytest.raises(HablaError, match="no Kubernetes access"):
        launcher.kubernetes_client()


def test_interrupt_deletes_the_job():
    def log(line: str) -> None:
        if "pods 2 Running" in line:
            raise KeyboardInterrupt

    with StandinK8s(steps=["Created", "Running"]) as api:
        with pytest.raises(KeyboardInterrupt):
            run_on_cluster(make_launch(), "pytorchjob", poll_s=0.01, log=log, api_client=api.api_client())
        assert api.calls("DELETE") and api.objects == {}


def test_sigterm_deletes_the_job():
    """A cancelled KFP step gets SIGTERM: the job must not outlive it."""
    previous = signal.getsignal(signal.SIGTERM)
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if "pods 2 Running" in line:
            os.kill(os.getpid(), signal.SIGTERM)

    with StandinK8s(steps=["Created", "Running"]) as api:
        with pytest.raises(KeyboardInterrupt):
            run_on_cluster(make_launch(), "pytorchjob", poll_s=0.01, log=log, api_client=api.api_client())
        assert api.calls("DELETE") and api.objects == {}
    assert signal.getsignal(signal.SIGTERM) is previous
    assert any(line.endswith("interrupted") for line in lines)


def test_no_secret_value_reaches_the_job_or_the_log(monkeypatch):
    """The launching pod may hold credentials in its environment; none of them may be copied anywhere."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET_VALUE + "-id")
    lines: list[str] = []
    with StandinK8s(steps=["Created", "Running", "Failed"]) as api:
        for kind in ("trainjob", "pytorchjob"):
            with pytest.raises(HablaError) as info:
                run(api, make_launch(), kind, lines)
            lines.append(str(info.value))
        sent = json.dumps([r.body for r in api.requests])
    assert SECRET_VALUE not in sent and SECRET_VALUE not in "\n".join(lines)
    assert '"secretKeyRef"' in sent


# ------------------------------------------------------------------------------------------- torchrun

WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    print(f"rank {dist.get_rank()}/{dist.get_world_size()} sum {int(total.item())} args {sys.argv[1:]}", flush=True)
    dist.destroy_process_group()
    if os.environ.get("FAIL_RANK") == os.environ["RANK"]:
        sys.exit(3)
    """
)


def test_torchrun_commands():
    (single,) = launcher.torchrun_commands(2, train_args=["--x"])
    assert single[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc-per-node=2",
        "-m",
        "habla.cli",
        "train",
        "--x",
    ]
    nodes = launcher.torchrun_commands(1, nnodes=2, port=29511)
    assert [c[5] for c in nodes] == ["--node-rank=0", "--node-rank=1"]
    assert all("--master-addr=127.0.0.1" in c and "--master-port=29511" in c for c in nodes)


def test_run_local_two_nodes_on_loopback(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    lines: list[str] = []
    launcher.run_local(
        ["--epochs", "1"], nnodes=2, nproc_per_node=1, program=[str(script)], log=lines.append, timeout_s=120
    )
    text = "\n".join(lines)
    assert "[node 0] rank 0/2 sum 3 args ['--epochs', '1']" in text
    assert "[node 1] rank 1/2 sum 3 args ['--epochs', '1']" in text


def test_run_local_failure_is_a_habla_error(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    lines: list[str] = []
    with pytest.raises(HablaError, match="failed"):
        launcher.run_local(
            [],
            nproc_per_node=2,
            program=[str(script)],
            env={"FAIL_RANK": "1"},
            log=lines.append,
            timeout_s=120,
        )
    assert any("rank 0/2 sum 3" in line for line in lines)


def test_run_local_bad_input():
    with pytest.raises(HablaError, match="nproc_per_node"):
        launcher.run_local([], nproc_per_node=0)


# ------------------------------------------------------------------------------------------- habla launch


def launch_cli(argv: list[str]) -> int:
    import argparse

    from habla import launch as launch_command

    parser = argparse.ArgumentParser()
    launch_command.add_arguments(parser)
    return launch_command.run(parser.parse_args(argv))


def test_launch_dry_run_prints_the_job(capsys, monkeypatch):
    import yaml

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    argv = ["--kind", "pytorchjob", "--image", "reg/habla-train:1", "--nodes", "2", "--gpus-per-node", "2"]
    argv += ["--env", "AWS_ENDPOINT_URL=http://s3:9000", "--dry-run", "--", "--data", "s3://b/d"]
    assert launch_cli(argv) == 0
    out = capsys.readouterr().out
    job = yaml.safe_load(out)
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["command"][-4:] == ["habla", "train", "--data", "s3://b/d"]
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert SECRET_VALUE not in out and "&id" not in out


def test_launch_bad_input_is_one_line(capsys):
    cli = pytest.importorskip("habla.cli")
    try:
        code = cli.main(["launch", "--kind", "trainjob", "--dry-run", "--env", "NOEQUALS"])
    except ModuleNotFoundError as exc:  # another command's module is not on this branch yet
        pytest.skip(str(exc))
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("habla launch: error:") and "\n" not in err
