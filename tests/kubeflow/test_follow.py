"""habla.kubeflow.follow: reading job status, and creating/following/cleaning up jobs against a stand-in
Kubernetes API on 127.0.0.1 (no cluster can run here)."""

from __future__ import annotations

import json
import os
import signal

import pytest
from conftest import SECRET_VALUE, make_launch
from k8s_standin import StandinK8s  # tests/ is on sys.path (pytest's default import mode)

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
