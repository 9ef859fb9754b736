"""habla.kubeflow.follow: reading job status, and creating/following/cleaning up jobs against a stand-in
Kubernetes API on 127.0.0.1 (no cluster can run here)."""

from __future__ import annotations

import json
import os
import signal

import pytest
from fixtures.cluster import SECRET_VALUE, make_launch
from standins.k8s_api import StandinK8s  # tests/ is on sys.path (pytest's default import mode)

from habla.core.errors import HablaError
from habla.kubeflow import follow, jobs
from habla.kubeflow.follow import job_state, run_on_cluster
from habla.kubeflow.jobs import TrainLaunch, build_trainjob


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
        assert post.path == f"/apis/{jobs.KINDS[kind].api_version}/namespaces/team-asr/{plural}"
        assert post.body == jobs.build_job(launch, kind)  # exactly what the builder made
        (delete,) = api.calls("DELETE", plural)
        assert delete.path.endswith(f"/{plural}/{launch.name}")
        assert delete.query["propagationPolicy"] == ["Background"]
        assert api.objects == {}
        pod_lists = api.calls("GET", "pods")
        assert pod_lists and pod_lists[0].query["labelSelector"] == [f"{jobs.KINDS[kind].pod_label}={launch.name}"]
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
        # the failed job's budget, not yet garbage-collected (the real collector is asynchronous)
        old = jobs.build_disruption_budget(launch, "trainjob", "uid-of-the-failed-job")
        api.budgets[("team-asr", old["metadata"]["name"])] = old
        run(api, launch, "trainjob", lines, keep=True)
        assert len(api.calls("POST", "trainjobs")) == 2  # 409, then the new job
        assert len(api.calls("DELETE")) == 1  # the failed job
        new = [b for b in api.budgets.values() if b is not old]
        assert [ref["uid"] for b in new for ref in b["metadata"]["ownerReferences"]] == [
            api.objects[("trainjobs", "team-asr", launch.name)]["metadata"]["uid"]]  # fmt: skip
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
        follow.kubernetes_client()


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


# ------------------------------------------------------------------- owner, disruption budget, placement

OWNER = {"apiVersion": "v1", "kind": "Pod", "name": "habla-train-step-1", "uid": "uid-step-pod-1"}


@pytest.mark.parametrize(("kind", "plural"), [("trainjob", "trainjobs"), ("pytorchjob", "pytorchjobs")])
def test_a_new_job_belongs_to_the_step_and_gets_a_disruption_budget(kind, plural):
    """The job is owned by the launcher's pod (the garbage collector deletes it with the pod: a killed step
    leaves no job holding GPUs) and its pods are covered by a PodDisruptionBudget owned by the job; the budget
    is validated against the Kubernetes schema by the stand-in."""
    launch = make_launch(owner=OWNER)
    lines: list[str] = []
    with StandinK8s(steps=["Created", "Running", "Succeeded"]) as api:
        run(api, launch, kind, lines, keep=True)
        job = api.objects[(plural, "team-asr", launch.name)]
        assert job["metadata"]["ownerReferences"] == [{**OWNER, "blockOwnerDeletion": False}]
        (((namespace, _), budget),) = api.budgets.items()
        assert namespace == "team-asr" and budget["metadata"]["name"].startswith(f"{launch.name}-")
        assert budget["spec"] == {"maxUnavailable": 0,
                                  "selector": {"matchLabels": {jobs.KINDS[kind].pod_label: launch.name}}}  # fmt: skip
        (ref,) = budget["metadata"]["ownerReferences"]
        assert ref["uid"] == job["metadata"]["uid"] and ref["kind"] == jobs.KINDS[kind].kind
        api.requests.clear()
        with api._lock:
            api._route("DELETE", f"/apis/{jobs.KINDS[kind].api_version}/namespaces/team-asr/{plural}/{launch.name}",
                       {}, None)  # fmt: skip
        assert not api.budgets  # deleted with its job


def test_an_adopted_job_is_handed_to_the_retrying_steps_pod():
    """A retried step (a new pod) adopts the job its earlier attempt created and makes itself its owner, so
    that the first attempt's pod going away does not take the job with it."""
    first = make_launch(owner=OWNER)
    second = make_launch(owner={**OWNER, "name": "habla-train-step-2", "uid": "uid-step-pod-2"})
    with StandinK8s(steps=["Running", "Running", "Succeeded"]) as api:
        api.put("trainjobs", "team-asr", build_trainjob(first), step=1)
        run(api, second, "trainjob", [])
        (patch,) = api.calls("PATCH", "trainjobs")
        assert patch.body == {"metadata": {"ownerReferences": [{**second.owner, "blockOwnerDeletion": False}]}}
        assert not api.calls("POST", "poddisruptionbudgets")  # the first attempt made it


def test_the_step_finds_its_own_pod(monkeypatch, tmp_path):
    from habla.kubeflow import cluster_step

    namespace = tmp_path / "namespace"
    namespace.write_text("team-asr")
    monkeypatch.setattr(cluster_step, "IN_CLUSTER_NAMESPACE", namespace)
    monkeypatch.setattr(cluster_step, "current_namespace", lambda: "team-asr")
    monkeypatch.setenv("HOSTNAME", "habla-train-abc-123")
    with StandinK8s() as api:
        api.own_pods[("team-asr", "habla-train-abc-123")] = "uid-abc"
        assert cluster_step.own_pod(api.api_client()) == {"apiVersion": "v1", "kind": "Pod",
                                                          "name": "habla-train-abc-123", "uid": "uid-abc"}  # fmt: skip
        monkeypatch.setenv("HOSTNAME", "gone")
        assert cluster_step.own_pod(api.api_client()) is None  # no owner, never a failed step


def test_pytorchjob_pods_get_the_runs_placement():
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    launch = make_launch(node_selector={"nvidia.com/gpu.product": "H100"}, tolerations=(toleration,),
                         priority_class="training-high")  # fmt: skip
    pod = jobs.build_pytorchjob(launch)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"} and pod["tolerations"] == [toleration]
    assert pod["priorityClassName"] == "training-high"
    lines: list[str] = []
    with StandinK8s() as api:
        run(api, launch, "trainjob", lines)
    assert any("come from ClusterTrainingRuntime" in line for line in lines)
