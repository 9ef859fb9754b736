"""habla against a multi-user Kubeflow Pipelines: tokens (a file, the environment, a pod's projected or requested
token), namespaces, the server's release, and the RBAC of manifests/ -- against the KFP stand-in enforcing
authentication and authorization as the upstream API server does (tests/standins/kfp_server.py), with the
SubjectAccessReview answered from the Roles and RoleBindings that the real kustomize renders from manifests/."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from fixtures.commands import run_habla
from fixtures.releases import ROOT
from standins.k8s_api import StandinK8s
from standins.kfp_server import KfpStandin, compile_fake_training_pipeline
from test_manifests import kustomize_bin

from habla.core.errors import HablaError
from habla.kubeflow import api, kfp_api, kfp_auth, watch

NAMESPACE = "kubeflow-user-example-com"  # the aws-s3 overlay's profile namespace
RUNNER = f"system:serviceaccount:{NAMESPACE}:{kfp_api.PIPELINE_SERVICE_ACCOUNT}"
RELEASE = "s3://cv/cv-corpus-25.0-2026-03-09-es.tar.gz"


@pytest.fixture(scope="module")
def rbac(tmp_path_factory):
    """The SubjectAccessReview the API server asks for, answered from the aws-s3 overlay's rendered RBAC the way
    Kubernetes' RBAC authorizer does: a RoleBinding in the namespace binds the user (a ServiceAccount subject is
    the user system:serviceaccount:<ns>:<name>) to a Role with a rule matching group, resource and verb."""
    work = tmp_path_factory.mktemp("manifests") / "manifests"
    shutil.copytree(ROOT / "manifests", work, ignore=shutil.ignore_patterns("s3-credentials.env"))
    overlay = work / "overlays" / "aws-s3"
    shutil.copy(overlay / "s3-credentials.env.example", overlay / "s3-credentials.env")
    out = subprocess.run([*kustomize_bin(), str(overlay)], capture_output=True, text=True, check=True, timeout=60)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    roles = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs if d["kind"] == "Role"}
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]

    def authorize(user: str, namespace: str, resource: str, verb: str) -> bool:
        for binding in bindings:
            if binding["metadata"]["namespace"] != namespace:
                continue
            users = {f"system:serviceaccount:{s.get('namespace', namespace)}:{s['name']}"
                     for s in binding["subjects"] if s["kind"] == "ServiceAccount"}  # fmt: skip
            role = roles.get((namespace, binding["roleRef"]["name"]))
            if user not in users or role is None:
                continue
            for rule in role["rules"]:
                if ("pipelines.kubeflow.org" in rule["apiGroups"] and resource in rule["resources"]
                        and verb in rule["verbs"] and not rule.get("resourceNames")):  # fmt: skip
                    return True
        return False

    return authorize


def test_a_token_file_submits_in_the_namespace_as_the_rbac_allows(rbac, tmp_path):
    """habla pipeline submit --namespace --token-file: every call reviewed for the account, in the namespace."""
    token = tmp_path / "token"
    token.write_text("runner-token\n")
    with KfpStandin(multi_user=True, tokens={"runner-token": (RUNNER, ["pipelines.kubeflow.org"])},
                    authorize=rbac) as kfp:  # fmt: skip
        result = run_habla("pipeline", "submit", "--host", kfp.url, "--namespace", NAMESPACE, "--token-file",
                           str(token), "--release", RELEASE, "--out", "s3://habla", "--run-name", "r1")  # fmt: skip
        assert result.returncode == 0, result.stderr
        [run] = kfp.runs.values()
        [experiment] = kfp.experiments.values()
        assert experiment["namespace"] == NAMESPACE
        asked = {(resource, verb) for _, _, resource, verb in kfp.reviews}
        assert {(r, v) for _, r, v in kfp_api.REQUIRED_PERMISSIONS} >= asked - {("pipelines", "get")}
        assert {u for u, *_ in kfp.reviews} == {RUNNER} and {n for _, n, *_ in kfp.reviews} == {NAMESPACE}
    assert "runner-token" not in result.stdout + result.stderr
    assert run["run_id"] in result.stdout


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "Kubeflow Pipelines is multi-user"),  # no token at all
        ({"HABLA_KFP_TOKEN": "wrong-audience"}, "Failed to find all of '[pipelines.kubeflow.org]' in audience"),
        ({"HABLA_KFP_TOKEN": "not-bound"}, "PermissionDenied"),  # authenticated, no RoleBinding
    ],
)
def test_refusals_are_one_line_with_the_way_out(rbac, env, expected):
    tokens = {"wrong-audience": (RUNNER, ["https://kubernetes.default.svc"]),
              "not-bound": (f"system:serviceaccount:{NAMESPACE}:default", ["pipelines.kubeflow.org"])}  # fmt: skip
    with KfpStandin(multi_user=True, tokens=tokens, authorize=rbac) as kfp:
        environment = {"KF_PIPELINES_SA_TOKEN_PATH": "/nonexistent", **env}
        result = run_habla("pipeline", "submit", "--host", kfp.url, "--namespace", NAMESPACE, "--release", RELEASE,
                           "--out", "s3://habla", env=environment)  # fmt: skip
        assert not kfp.runs
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "--token-file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    for value in env.values():
        assert value not in result.stderr


def test_a_multi_user_server_needs_a_namespace_outside_a_pod(rbac, monkeypatch):
    monkeypatch.setenv("HABLA_KFP_TOKEN", "runner-token")
    monkeypatch.setattr(api, "IN_CLUSTER_NAMESPACE", ROOT / "no-such-file")
    with KfpStandin(multi_user=True, tokens={"runner-token": (RUNNER, ["pipelines.kubeflow.org"])}) as kfp:
        with pytest.raises(HablaError, match="multi-user: pass --namespace"):
            kfp_api.connect(kfp.url)


@pytest.mark.parametrize(("tag", "ok"), [("2.15.0", False), ("2.16.1", True), ("2.17.0", True), ("unknown", True)])
def test_the_server_release_is_checked(tag, ok):
    with KfpStandin(tag_name=tag) as kfp:
        if ok:
            kfp_api.connect(kfp.url)
        else:
            with pytest.raises(HablaError, match="is 2.15.0: habla's pipeline needs 2.16 or newer"):
                kfp_api.connect(kfp.url)


def test_a_login_page_in_the_way_is_named():
    """Dex/oauth2-proxy answer an unauthenticated API request with a redirect to their login page."""

    class Login(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", "https://kubeflow.example.com/oauth2/start?rd=%2Fpipeline")
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Login)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(HablaError, match=r"login page \(https://kubeflow.example.com/oauth2/start\).*--token-file"):
            kfp_api.connect(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


def fake_pod_token(tmp_path, namespace: str, account: str):
    """A pod's own service account token (only its claims matter to habla: who it is)."""
    claims = {"sub": f"system:serviceaccount:{namespace}:{account}", "aud": ["https://kubernetes.default.svc"]}
    encode = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
    path = tmp_path / "sa-token"
    path.write_text(f"{encode({'alg': 'RS256'})}.{encode(claims)}.signature")
    return path


def test_the_watcher_pipeline_pod_requests_its_own_token(rbac, tmp_path, monkeypatch):
    """In a KFP step (no projected token), against a multi-user server: a TokenRequest for the pod's own account
    and the KFP audience, allowed by the Role habla-kfp-token; the runs are created in the pod's namespace."""
    namespace_file = tmp_path / "namespace"
    namespace_file.write_text(NAMESPACE)
    monkeypatch.setattr(api, "IN_CLUSTER_NAMESPACE", namespace_file)
    monkeypatch.setattr(api, "IN_CLUSTER_TOKEN", fake_pod_token(tmp_path, NAMESPACE, kfp_api.PIPELINE_SERVICE_ACCOUNT))
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-projected-token"))
    monkeypatch.delenv("HABLA_KFP_TOKEN", raising=False)
    inbox = tmp_path / "inbox"
    (inbox / "cv-corpus-25.0-2026-03-09" / "es").mkdir(parents=True)
    (inbox / "cv-corpus-25.0-2026-03-09" / "es" / "validated.tsv").write_text("path\tsentence\n")
    with StandinK8s() as k8s:
        k8s.token_accounts.add((NAMESPACE, kfp_api.PIPELINE_SERVICE_ACCOUNT))
        monkeypatch.setattr(api, "kubernetes_client", lambda api_client=None: api_client or k8s.api_client())
        with KfpStandin(multi_user=True, tokens=k8s.issued, authorize=rbac) as kfp:
            decisions = watch.watch(str(inbox), str(tmp_path / "state"), output_root="s3://habla", host=kfp.url,
                                    package=compile_fake_training_pipeline(str(tmp_path)))  # fmt: skip
            assert [d.action for d in decisions] == ["submitted"], decisions
            [run] = kfp.runs.values()
            assert kfp.experiments[run["experiment_id"]]["namespace"] == NAMESPACE
            assert {u for u, *_ in kfp.reviews} == {RUNNER}
        [(token, (user, audiences))] = k8s.issued.items()
        assert user == RUNNER and audiences == [kfp_auth.AUDIENCE]


def test_a_token_request_the_rbac_refuses_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(api, "IN_CLUSTER_TOKEN", fake_pod_token(tmp_path, NAMESPACE, "default-editor"))
    with StandinK8s() as k8s, pytest.raises(HablaError, match="not allowed to create serviceaccounts/token"):
        api.request_token(kfp_auth.AUDIENCE, api_client=k8s.api_client())


def test_schedule_runs_the_watcher_as_the_account_manifests_binds(tmp_path):
    """habla schedule: the recurring run's runs execute as habla-pipeline-runner (Leases, KFP runs), unless told."""
    from habla.cli.schedule import watcher_params  # noqa: F401 - the CLI's parameters are what is scheduled
    from habla.kubeflow.compile import CompileOptions
    from habla.ops import schedule

    params = {"inbox": "s3://cv/inbox", "state": "s3://cv/state", "output_root": "s3://cv", "training_params": "{}"}
    with KfpStandin() as kfp:
        ref = schedule.schedule(host=kfp.url, namespace=None, name="w", experiment="habla-watcher",
                                cron="0 0 6 * * *", params=params, compile_options=CompileOptions())  # fmt: skip
        assert kfp.recurring_runs[ref.recurring_run_id]["service_account"] == kfp_api.PIPELINE_SERVICE_ACCOUNT
        again = schedule.schedule(host=kfp.url, namespace=None, name="w", experiment="habla-watcher",
                                  cron="0 0 6 * * *", params=params, compile_options=CompileOptions())  # fmt: skip
        assert again.action == "unchanged"
        other = schedule.schedule(host=kfp.url, namespace=None, name="w", experiment="habla-watcher",
                                  cron="0 0 6 * * *", params=params, compile_options=CompileOptions(),
                                  service_account="")  # fmt: skip
        assert other.action == "updated" and "service_account" not in kfp.recurring_runs[other.recurring_run_id]


def test_schedule_on_a_multi_user_kubeflow_creates_the_recurring_run_in_the_namespace(rbac, tmp_path):
    """habla schedule --namespace --token-file against a multi-user server: a person whose profile grants what
    Kubeflow's kubeflow-edit role does (recurring runs are the resource "jobs" upstream) schedules the watcher
    in their namespace, to run as habla-pipeline-runner; the runner's own token, bound to no "jobs" rule by
    manifests/, is refused in one line."""
    person = f"user:alice@example.com:{NAMESPACE}"

    def authorize(user: str, namespace: str, resource: str, verb: str) -> bool:
        edit = user == person and namespace == NAMESPACE and resource in ("experiments", "pipelines", "runs", "jobs")
        return edit or rbac(user, namespace, resource, verb)

    tokens = {"alice-token": (person, ["pipelines.kubeflow.org"]), "runner-token": (RUNNER, ["pipelines.kubeflow.org"])}
    (tmp_path / "alice").write_text("alice-token\n")
    (tmp_path / "runner").write_text("runner-token\n")
    common = ["schedule", "--cron", "0 0 6 * * 1", "--namespace", NAMESPACE, "--inbox", "s3://cv/inbox",
              "--state", "s3://cv/state", "--output-root", "s3://cv"]  # fmt: skip
    with KfpStandin(multi_user=True, tokens=tokens, authorize=authorize) as kfp:
        result = run_habla(*common, "--host", kfp.url, "--token-file", str(tmp_path / "alice"))
        assert result.returncode == 0, result.stderr
        [recurring] = kfp.recurring_runs.values()
        assert recurring["service_account"] == kfp_api.PIPELINE_SERVICE_ACCOUNT
        assert kfp.experiments[recurring["experiment_id"]]["namespace"] == NAMESPACE
        assert ("jobs", "create") in {(r, v) for u, n, r, v in kfp.reviews if u == person and n == NAMESPACE}

        refused = run_habla(*common, "--host", kfp.url, "--token-file", str(tmp_path / "runner"), "--name", "other")
        assert refused.returncode != 0 and len(kfp.recurring_runs) == 1
        errors = [line for line in refused.stderr.splitlines() if not line.startswith("habla: warning: image")]
        assert len(errors) == 1 and errors[0].startswith("habla schedule: error:") and "PermissionDenied" in errors[0]
        assert "runner-token" not in refused.stderr
