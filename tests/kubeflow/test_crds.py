"""Every TrainJob and PyTorchJob habla.kubeflow.jobs builds, checked against the upstream CRDs of every supported
release (vendored in tests/kubeflow/upstream/) as a strict ``kubectl apply`` would: unknown fields, types,
enums, patterns, required fields; and the compatibility matrix of docs/operators.md against what is vendored.
The rendered manifests are checked the same way in test_manifests.py."""

from __future__ import annotations

import copy
import json
import re

import pytest
from crd_schemas import UPSTREAM, cel_rules, errors, load, releases
from fixtures.cluster import make_launch
from fixtures.releases import ROOT

from habla.kubeflow import jobs

TRAINER = [r for r in releases() if r.startswith("trainer-")]
TRAINING_OPERATOR = [r for r in releases() if r.startswith("training-operator-")]

# Launches that exercise every branch of the builders: one node and many, GPUs or none, resources, env, labels.
LAUNCHES = {
    "2x4-gpus": {},
    "1-cpu-node": {"nodes": 1, "gpus_per_node": 0, "cpu": None, "memory": None, "env": {}, "labels": {}},
    "cpu-procs": {"gpus_per_node": 0, "nproc_per_node": 3, "cpu": "500m", "memory": "1.5Gi"},
    "8x8-no-secret": {"nodes": 8, "gpus_per_node": 8, "s3_secret": None},
}


def test_the_vendored_crds_say_where_they_come_from():
    assert TRAINER == ["trainer-v2.0.0", "trainer-v2.1.0", "trainer-v2.2.0", "trainer-v2.3.0"]
    assert TRAINING_OPERATOR == ["training-operator-v1.9.4"]
    for path in sorted(UPSTREAM.glob("*/*.kubeflow.org.json")):
        crd = load(path.parent.name, path.stem)
        source = crd["source"]
        assert path.parent.name.endswith(source["tag"]) and re.fullmatch(r"[0-9a-f]{40}", source["commit"])
        assert source["repository"] == "https://github.com/kubeflow/trainer" and source["path"].endswith(".yaml")
        assert crd["name"] == path.stem == f"{crd['names']['plural']}.{crd['group']}"
    for path in sorted(UPSTREAM.glob("kfp-*/SOURCE.json")):
        for name, source in json.loads(path.read_text()).items():
            assert (path.parent / name).is_file() and f"kfp-{source['tag']}" == path.parent.name


def test_the_check_is_strict():
    """The validator refuses what strict kubectl apply refuses (a check that can fail)."""
    good = jobs.build_trainjob(make_launch())
    assert errors(good, "trainer-v2.3.0") == []

    def broken(change) -> list[str]:
        job = copy.deepcopy(good)
        change(job)
        return errors(job, "trainer-v2.3.0")

    assert "'numproc' was unexpected" in " ".join(broken(lambda j: j["spec"]["trainer"].update(numproc=2)))
    assert broken(lambda j: j["spec"]["trainer"].update(numNodes="2"))  # a string where the CRD wants an integer
    assert broken(lambda j: j["spec"]["trainer"]["env"][0].update(valueFrom={"secretKeyRef": {"nam": "x"}}))
    assert broken(lambda j: j["metadata"].update(label={"a": "b"}))  # ObjectMeta is strict too
    assert broken(lambda j: j["spec"].pop("runtimeRef"))  # required
    assert broken(lambda j: j["spec"]["trainer"]["resourcesPerNode"].update(limits={"cpu": []}))  # int-or-string
    runtime = load("trainer-v2.0.0", "clustertrainingruntimes.trainer.kubeflow.org")  # serves a ClusterTrainingRuntime
    assert runtime["names"]["kind"] == "ClusterTrainingRuntime"
    assert errors({"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob"}, "trainer-v2.3.0")  # not served there


@pytest.mark.parametrize("release", TRAINER)
@pytest.mark.parametrize("variant", sorted(LAUNCHES))
def test_every_trainjob_validates(release, variant):
    job = jobs.build_trainjob(make_launch(**LAUNCHES[variant]))
    assert errors(job, release) == []


@pytest.mark.parametrize("release", TRAINING_OPERATOR)
@pytest.mark.parametrize("variant", sorted(LAUNCHES))
def test_every_pytorchjob_validates(release, variant):
    job = jobs.build_pytorchjob(
        make_launch(service_account="habla-train", image_pull_policy="Always", **LAUNCHES[variant])
    )
    assert errors(job, release) == []


# CEL rules (x-kubernetes-validations) are not evaluated by the JSON Schema check: the ones that apply to
# habla's objects are pinned here with what makes habla's objects pass them. A new rule fails this test.
TRANSITION = "oldSelf"  # rules comparing with the stored object apply to updates only: habla only creates
TRAINJOB_RULES = {
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')": lambda job: re.fullmatch(
        r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"]
    ),
    "size(self.metadata.name) <= 63": lambda job: len(job["metadata"]["name"]) <= 63,
}


@pytest.mark.parametrize("release", TRAINER)
def test_trainjob_cel_rules(release):
    for variant in LAUNCHES.values():
        job = jobs.build_trainjob(make_launch(**variant))
        for path, rule in cel_rules(job, release):
            if TRANSITION in rule:
                continue
            assert rule in TRAINJOB_RULES, f"{release}: new CEL rule on {path}: {rule}"
            assert TRAINJOB_RULES[rule](job), (path, rule)


@pytest.mark.parametrize("release", TRAINING_OPERATOR)
def test_pytorchjob_cel_rules(release):
    job = jobs.build_pytorchjob(make_launch())
    assert [rule for _, rule in cel_rules(job, release) if TRANSITION not in rule] == []


# ----------------------------------------------------------------------------------- compatibility matrix


def matrix() -> dict[str, list[str]]:
    """docs/operators.md's compatibility table: first cell -> the versions named in the second."""
    rows = {}
    text = (ROOT / "docs" / "operators.md").read_text(encoding="utf-8")
    section = text.split("## Compatibility", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and not set(cells[0]) <= {"-", " "}:
            rows[cells[0]] = re.findall(r"v?\d+\.\d+(?:\.\d+)?", cells[1])
    return rows


def test_the_compatibility_matrix_is_what_the_tests_check():
    rows = matrix()
    assert rows["Kubeflow Trainer"] == [r.removeprefix("trainer-") for r in TRAINER]
    assert rows["Kubeflow Training Operator"] == [r.removeprefix("training-operator-") for r in TRAINING_OPERATOR]
    backends = sorted(p.name.removeprefix("kfp-") for p in UPSTREAM.glob("kfp-*"))
    assert rows["Kubeflow Pipelines (backend)"] == backends == ["2.16.0", "2.17.0"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert rows["Kubeflow Pipelines SDK (`kfp`, in the images)"] == re.findall(r'"kfp==([\d.]+)"', pyproject)
    # KFP 2.15 ran a named ParallelFor feeding dsl.Collected wrongly (fixed in 2.16: kubeflow/pipelines #12808,
    # #13239), and habla's conversion fan-out is exactly that: no page may claim 2.15 works.
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert not re.search(r"2\.15(\.\d+)? (or newer|and (later|newer))|2\.15\+", page.read_text()), page
