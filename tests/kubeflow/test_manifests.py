"""manifests/: every document's structure, the overlays rendered by the real kustomize (``kubectl kustomize``)
and validated against the Kubernetes schemas (custom resources: against the vendored upstream CRDs, strictly),
RBAC that covers what habla.kubeflow.follow calls, the object store endpoint against KFP's real Service at the
supported versions, the kfp-launcher configuration, and no secret value anywhere. No cluster runs here: nothing
is applied."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from crd_schemas import UPSTREAM, crd_for, errors, releases
from fixtures.releases import ROOT
from kubernetes_validate import validate as k8s_validate

from habla.kubeflow import follow, jobs, kfp_api, lease
from habla.runs import parameters

MANIFESTS = ROOT / "manifests"
OVERLAYS = {"kfp-seaweedfs": "kubeflow", "aws-s3": "kubeflow-user-example-com"}
K8S_VERSION = "1.33"  # schemas of a current Kubernetes release; the manifests use only stable APIs
KINDS_WITHOUT_NAMESPACE = {"ClusterTrainingRuntime", "ClusterRole", "ClusterRoleBinding", "Namespace"}


def yaml_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*.yaml"))


def kustomize_bin() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if os.environ.get("HABLA_REQUIRE_KUSTOMIZE") == "1":  # .ci/run: the manifests must be rendered
        pytest.fail("neither kubectl nor kustomize is installed, and HABLA_REQUIRE_KUSTOMIZE=1")
    pytest.skip("neither kubectl nor kustomize is installed (kubectl kustomize, v5)")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Each overlay (and runtimes/) rendered from a copy of manifests/ whose credentials files are the examples."""
    work = tmp_path_factory.mktemp("manifests") / "manifests"
    shutil.copytree(MANIFESTS, work, ignore=shutil.ignore_patterns("s3-credentials.env"))
    out = {}
    for target in [f"overlays/{name}" for name in OVERLAYS] + ["runtimes"]:
        for example in (work / target).glob("*.env.example"):
            shutil.copy(example, example.with_suffix(""))
        result = subprocess.run(
            [*kustomize_bin(), str(work / target)], capture_output=True, text=True, check=False, timeout=60
        )
        assert result.returncode == 0, result.stderr
        out[target] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return out


def by_kind(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


# ----------------------------------------------------------------------------- files as they are in git


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_every_document_is_well_formed(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str), path
        if doc["kind"] == "Kustomization":
            for entry in doc.get("resources", []) + [p["path"] for p in doc.get("patches", []) if "path" in p]:
                assert (path.parent / entry).exists(), f"{path}: {entry} does not exist"
            for gen in doc.get("secretGenerator", []):
                for env in gen.get("envs", []):  # the real file is made from an example, never committed
                    assert (path.parent / f"{env}.example").exists(), f"{path}: no {env}.example"
        else:
            assert doc["metadata"]["name"], path
            assert doc["kind"] != "Secret", f"{path}: Secrets are generated from a git-ignored file, not committed"


def test_credentials_files_are_ignored_and_examples_hold_placeholders():
    examples = sorted(MANIFESTS.glob("overlays/*/s3-credentials.env.example"))
    assert len(examples) == len(OVERLAYS)
    for example in examples:
        values = dict(
            line.split("=", 1) for line in example.read_text().splitlines() if line and not line.startswith("#")
        )
        assert set(values) == set(jobs.SECRET_KEYS)
        assert all(v.startswith("REPLACE_ME") for v in values.values()), example
        real = example.with_suffix("")
        result = subprocess.run(["git", "check-ignore", "-q", str(real)], cwd=ROOT, capture_output=True, check=False)
        if result.returncode == 128:
            pytest.skip("not a git checkout")
        assert result.returncode == 0, f"{real} is not ignored by git"


# ------------------------------------------------------------------------------------ rendered overlays


def test_rendered_documents_match_the_kubernetes_schemas(rendered):
    for target, docs in rendered.items():
        assert docs, target
        for doc in docs:
            if "kubeflow.org/" in doc["apiVersion"]:
                continue  # a custom resource: checked against the upstream CRDs below
            k8s_validate(doc, K8S_VERSION, strict=True)


def test_rendered_custom_resources_match_every_supported_crd(rendered):
    """Strict kubectl apply of each custom resource on every supported release that serves its kind."""
    checked = 0
    for docs in rendered.values():
        for doc in docs:
            if "kubeflow.org/" not in doc["apiVersion"]:
                continue
            serving = [r for r in releases() if crd_for(r, doc["apiVersion"], doc["kind"])]
            assert serving, f"no supported release serves {doc['kind']}"
            for release in serving:
                assert errors(doc, release) == [], (release, doc["kind"], doc["metadata"]["name"])
                checked += 1
    assert checked >= 4  # the training runtime, on Trainer v2.0 to v2.3


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_namespace_and_rbac_cover_the_launcher(rendered, overlay):
    docs = rendered[f"overlays/{overlay}"]
    namespace = OVERLAYS[overlay]
    assert all(d["metadata"].get("namespace") == namespace for d in docs if d["kind"] not in KINDS_WITHOUT_NAMESPACE)
    by_kind(docs, "ServiceAccount", kfp_api.PIPELINE_SERVICE_ACCOUNT)  # what habla pipeline submit runs steps as
    role = by_kind(docs, "Role", "habla-launcher")
    granted = _granted(role)
    missing = set(follow.REQUIRED_PERMISSIONS) - granted
    assert not missing, f"habla-launcher lacks {missing}"
    assert not [v for *_, v in granted if v in ("*", "escalate", "bind", "impersonate")]
    # A KFP step needs no pod patch (Argo >= 3.4 reports through workflowtaskresults; KFP's driver only reads)
    assert ("", "pods", "patch") not in _granted(by_kind(docs, "Role", "habla-kfp-step"))
    for name in ("habla-launcher", "habla-kfp-step"):
        binding = by_kind(docs, "RoleBinding", name)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
        assert {"kind": "ServiceAccount", "name": "habla-pipeline-runner", "namespace": namespace} in binding[
            "subjects"
        ]
        assert all(s.get("namespace") == namespace for s in binding["subjects"])


def kfp_services() -> dict[str, dict[str, set[int]]]:
    """Services of standalone KFP in namespace kubeflow by vendored version (tests/kubeflow/upstream/kfp-*)."""
    out = {}
    for folder in sorted(UPSTREAM.glob("kfp-*")):
        services = [yaml.safe_load(p.read_text()) for p in sorted(folder.glob("*-service.yaml"))]
        out[folder.name] = {s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in services}
    return out


def test_kfp_seaweedfs_overlay_uses_kfps_object_store_and_leaves_kfps_own_config(rendered):
    docs = rendered["overlays/kfp-seaweedfs"]
    endpoint = by_kind(docs, "ConfigMap", "habla-s3-config")["data"]["AWS_ENDPOINT_URL"]
    host, port = endpoint.removeprefix("http://").split(":")
    service, namespace = host.split(".")[:2]
    assert namespace == "kubeflow"
    versions = kfp_services()
    assert set(versions) == {"kfp-2.16.0", "kfp-2.17.0"}  # the supported backends (docs/operators.md)
    for version, services in versions.items():
        assert int(port) in services.get(service, set()), f"{version} has no Service {service} on port {port}"
    # KFP's own kfp-launcher in kubeflow sets the pipeline root of every pipeline there: not ours to replace.
    assert not [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kfp-launcher"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_s3_settings_and_the_pipeline_root(rendered, overlay):
    docs = rendered[f"overlays/{overlay}"]
    secret = by_kind(docs, "Secret", jobs.DEFAULT_S3_SECRET)  # exact name: no kustomize hash suffix
    assert set(secret["data"]) == set(jobs.SECRET_KEYS)
    for value in secret["data"].values():  # rendered here from the examples: placeholders only
        assert base64.b64decode(value).decode().startswith("REPLACE_ME")
    settings = by_kind(docs, "ConfigMap", "habla-s3-config")["data"]
    assert settings["HABLA_OUTPUT_ROOT"].startswith("s3://")
    assert not [k for k in settings if jobs._SECRET_LOOKING.search(k)]
    if overlay == "kfp-seaweedfs":
        return  # the pipeline root stays KFP's (above)
    data = by_kind(docs, "ConfigMap", "kfp-launcher")["data"]
    assert data["defaultPipelineRoot"].startswith("s3://")
    s3 = yaml.safe_load(data["providers"])["s3"]["default"]
    assert s3["endpoint"] and "://" not in s3["endpoint"]  # KFP wants host[:port]; disableSSL picks the scheme
    assert isinstance(s3["disableSSL"], bool) and isinstance(s3["forcePathStyle"], bool) and s3["region"]
    assert s3["credentials"] == {
        "fromEnv": False,
        "secretRef": {
            "secretName": jobs.DEFAULT_S3_SECRET,
            "accessKeyKey": "AWS_ACCESS_KEY_ID",
            "secretKeyKey": "AWS_SECRET_ACCESS_KEY",
        },
    }
    # The same bucket holds the pipeline root and habla's outputs.
    assert data["defaultPipelineRoot"].split("/")[2] == settings["HABLA_OUTPUT_ROOT"].split("/")[2]


def test_training_runtime(rendered):
    (runtime,) = rendered["runtimes"]
    assert runtime["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and runtime["kind"] == "ClusterTrainingRuntime"
    assert "namespace" not in runtime["metadata"]
    assert runtime["spec"]["mlPolicy"]["torch"] == {}  # numProcPerNode comes from the TrainJob (gone in v2.2)
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    # The trainer's TrainJob overrides find their target by these names.
    assert job["name"] == "node"
    assert job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    pod = job["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "node"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": jobs.SHM_SIZE}} in pod["volumes"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    # Istio's opt-out on the pods (a profile namespace injects a sidecar otherwise), and the GPU taint tolerated
    template = job["template"]["spec"]["template"]["metadata"]
    assert template["labels"] | template["annotations"] == jobs.NO_ISTIO_SIDECAR
    assert parameters.GPU_TOLERATION in pod["tolerations"]
    # It is what habla's TrainJobs use unless told otherwise (the pipeline's runtime parameter defaults to it).
    assert runtime["metadata"]["name"] == jobs.DEFAULT_RUNTIME
    job_spec = jobs.build_trainjob(jobs.TrainLaunch(image="x/habla-train:1", name="habla-train-x"))
    assert job_spec["spec"]["runtimeRef"]["name"] == "habla-torch-distributed"


def test_no_secret_value_in_manifests(rendered):
    """Nothing committed or rendered holds a credential: only references, and the examples' placeholders."""
    for path in MANIFESTS.rglob("*"):
        if path.is_file() and path.name != "s3-credentials.env":
            text = path.read_text()
            assert "AKIA" not in text and "minio123" not in text, path  # AWS key ids, KFP's default password
    for docs in rendered.values():
        for doc in docs:
            if doc["kind"] == "Secret":
                continue
            text = yaml.safe_dump(doc)
            assert "REPLACE_ME" not in text and "stringData" not in text


def _granted(role: dict) -> set[tuple[str, str, str]]:
    return {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_rbac_covers_the_watcher_leases(rendered, overlay):
    """The Role habla-watcher grants what habla.kubeflow.lease calls (habla watch --claims lease|auto)."""
    docs = rendered[f"overlays/{overlay}"]
    role = by_kind(docs, "Role", "habla-watcher")
    assert set(lease.REQUIRED_PERMISSIONS) <= _granted(role), f"habla-watcher lacks {set(lease.REQUIRED_PERMISSIONS)}"
    assert {r for _, r, _ in _granted(role)} == {"leases"} and "delete" not in {v for *_, v in _granted(role)}
    binding = by_kind(docs, "RoleBinding", "habla-watcher")
    assert binding["roleRef"]["name"] == "habla-watcher"
    assert {"kind": "ServiceAccount", "name": "habla-pipeline-runner", "namespace": OVERLAYS[overlay]} in (
        binding["subjects"]
    )


def test_the_cronjob_runs_as_an_account_bound_to_the_watcher_role():
    result = subprocess.run(
        [*kustomize_bin(), str(MANIFESTS / "cronjob")], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    for doc in docs:
        k8s_validate(doc, K8S_VERSION, strict=True)
    cronjob = by_kind(docs, "CronJob", "habla-release-watcher")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    by_kind(docs, "ServiceAccount", account)
    binding = by_kind(docs, "RoleBinding", account)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "habla-watcher"}
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]
    (container,) = pod["containers"]
    assert "--claims=$(HABLA_CLAIMS)" in container["args"]
    config = [d for d in docs if d["kind"] == "ConfigMap"][0]["data"]
    assert config["HABLA_CLAIMS"] in ("s3", "lease", "auto")


# ------------------------------------------------------------------------------- multi-user, AWS, CronJob


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_configmap_key_a_step_requires_is_in_the_overlay(rendered, overlay, tmp_path):
    """A step maps ConfigMap keys to its env; the kubelet refuses to start a container whose required key is
    missing (CreateContainerConfigError). Read from the compiled pipelines (what KFP's driver turns into
    configMapKeyRef, optional as compiled: backend/src/v2/driver/k8s.go) and checked against each rendered overlay."""
    from habla.pipelines import training_pipeline, watcher_pipeline

    config_maps = {d["metadata"]["name"]: d.get("data") or {} for d in rendered[f"overlays/{overlay}"]
                   if d["kind"] == "ConfigMap"}  # fmt: skip
    checked = 0
    for compile_ in (training_pipeline.compile_pipeline, watcher_pipeline.compile_pipeline):
        path = compile_(str(tmp_path / "p.yaml"))
        _, platform = yaml.safe_load_all(open(path, encoding="utf-8"))
        for name, executor in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items():
            for entry in executor.get("configMapAsEnv", []):
                if entry.get("optional"):
                    continue
                data = config_maps.get(entry["configMapName"])
                assert data is not None, f"{overlay}: {name} needs ConfigMap {entry['configMapName']}"
                for key in entry["keyToEnv"]:
                    assert key["configMapKey"] in data, f"{overlay}: {name} needs {key['configMapKey']}"
                    checked += 1
    assert checked > 10


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_rbac_lets_the_watcher_submit_runs_to_a_multi_user_kfp(rendered, overlay):
    """What KFP's API server authorizes for the watcher's calls (kfp_api.REQUIRED_PERMISSIONS) is granted to the
    account the watcher pipeline runs as, and it may request a token of that account alone."""
    docs = rendered[f"overlays/{overlay}"]
    assert set(kfp_api.REQUIRED_PERMISSIONS) <= _granted(by_kind(docs, "Role", "habla-kfp-client"))
    for name in ("habla-kfp-client", "habla-kfp-token"):
        binding = by_kind(docs, "RoleBinding", name)
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": kfp_api.PIPELINE_SERVICE_ACCOUNT,
                                        "namespace": OVERLAYS[overlay]}]  # fmt: skip
    (rule,) = by_kind(docs, "Role", "habla-kfp-token")["rules"]
    assert rule == {"apiGroups": [""], "resources": ["serviceaccounts/token"],
                    "resourceNames": [kfp_api.PIPELINE_SERVICE_ACCOUNT], "verbs": ["create"]}  # fmt: skip


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of a container's args (k8s.io/kubernetes third_party/forked/golang/expansion:
    a defined variable is replaced, an undefined one left as it is, $$ is a literal $)."""
    import re

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), value)


def test_the_cronjob_submits_runs_with_its_images_and_its_token(tmp_path):
    """The CronJob's images reach the runs it submits: its args, expanded with its ConfigMap the way the kubelet
    does, parsed by habla watch's own parser, give the compile options the watcher compiles the training pipeline
    with; its pod mounts a projected token for KFP's audience where habla looks for one, and opts out of Istio."""
    from habla.cli import watch as watch_cli
    from habla.cli.common import compile_options
    from habla.kubeflow import kfp_auth

    result = subprocess.run([*kustomize_bin(), str(MANIFESTS / "cronjob")], capture_output=True, text=True,
                            check=False, timeout=60)  # fmt: skip
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    cronjob = by_kind(docs, "CronJob", "habla-release-watcher")
    template = cronjob["spec"]["jobTemplate"]["spec"]["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    config = [d for d in docs if d["kind"] == "ConfigMap"][0]["data"]
    env = {**config, **{e["name"]: e["value"] for e in container.get("env", []) if "value" in e}}
    args = [expand(a, env) for a in container["args"]]
    assert not [a for a in args if "$(" in a], args
    import argparse

    parser = argparse.ArgumentParser()
    watch_cli.add_arguments(parser)
    options = compile_options(parser.parse_args(args[1:]))
    assert options.prep_image == config["HABLA_PREP_IMAGE"] and options.train_image == config["HABLA_TRAIN_IMAGE"]
    # the token: projected for the audience the API server reviews, at the path kfp and habla read
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "kfp-token"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "kfp-token"]
    (source,) = volume["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == kfp_auth.AUDIENCE
    assert f"{mount['mountPath']}/{source['serviceAccountToken']['path']}" == kfp_auth.SA_TOKEN_PATH
    assert template["metadata"]["annotations"] == jobs.NO_ISTIO_SIDECAR
    assert template["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    # and the RBAC to submit runs
    binding = by_kind(docs, "RoleBinding", "habla-release-watcher-kfp")
    assert binding["roleRef"]["name"] == "habla-kfp-client"
    assert {"kind": "ServiceAccount", "name": pod["serviceAccountName"]} in binding["subjects"]
