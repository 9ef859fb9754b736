"""Vendor upstream facts for tests/kubeflow/, from local clones of the upstream repositories.

    git clone https://github.com/kubeflow/trainer /tmp/trainer       # the Training Operator's repository, renamed
    git clone https://github.com/kubeflow/pipelines /tmp/pipelines
    python tests/kubeflow/upstream/vendor.py /tmp/trainer /tmp/pipelines

For each (tag, CRD file) in CRD_SOURCES it reads the file at that tag (``git show TAG:PATH``) and writes
``<name>-<tag>/<crd name>.json``: the CRD's group, names, scope and versions with their ``openAPIV3Schema``,
``description`` fields removed (they are 90 % of the bytes and change nothing that is validated), plus where
it came from: repository, tag, commit, path and the SHA-256 of the upstream file. KFP_SOURCES are copied as
they are to ``kfp-<tag>/<file name>``, their origin recorded in ``kfp-<tag>/SOURCE.json``. Data only,
Apache-2.0 like their sources; no upstream code is copied.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import yaml

REPOSITORY = "https://github.com/kubeflow/trainer"
KFP_REPOSITORY = "https://github.com/kubeflow/pipelines"
TRAINER_CRDS = (
    "manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml",
    "manifests/base/crds/trainer.kubeflow.org_clustertrainingruntimes.yaml",
)
# (folder prefix, tag, files): Kubeflow Trainer v2 releases, and the last Training Operator v1 release.
CRD_SOURCES = [
    *(("trainer", tag, TRAINER_CRDS) for tag in ("v2.0.0", "v2.1.0", "v2.2.0", "v2.3.0")),
    ("training-operator", "v1.9.4", ("manifests/base/crds/kubeflow.org_pytorchjobs.yaml",)),
]
# Standalone KFP at the supported backend versions (docs/operators.md): the object store's Service and Deployment
# (which SeaweedFS release: habla.core.conditional.RACY_STORES), and the install config (the time zone of recurring
# runs, cronScheduleTimezone, docs/operations.md).
KFP_SOURCES = [
    (
        tag,
        (
            "manifests/kustomize/third-party/seaweedfs/base/seaweedfs/seaweedfs-service.yaml",
            "manifests/kustomize/third-party/seaweedfs/base/seaweedfs/seaweedfs-deployment.yaml",
            "manifests/kustomize/base/installs/generic/pipeline-install-config.yaml",
        ),
    )
    for tag in ("2.16.0", "2.17.0")
]
HERE = Path(__file__).resolve().parent


def without_descriptions(node):
    if isinstance(node, dict):
        return {k: without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [without_descriptions(v) for v in node]
    return node


def git(clone: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-C", str(clone), *args], capture_output=True, check=True).stdout


def vendor_kfp(clone: Path) -> list[Path]:
    written = []
    for tag, paths in KFP_SOURCES:
        folder = HERE / f"kfp-{tag}"
        folder.mkdir(exist_ok=True)
        commit = git(clone, "rev-parse", f"{tag}^{{commit}}").decode().strip()
        sources = {}
        for path in paths:
            raw = git(clone, "show", f"{tag}:{path}")
            (folder / Path(path).name).write_bytes(raw)
            sources[Path(path).name] = {
                "repository": KFP_REPOSITORY,
                "tag": tag,
                "commit": commit,
                "path": path,
                "sha256": hashlib.sha256(raw).hexdigest(),
                "license": "Apache-2.0",
            }
            written.append(folder / Path(path).name)
        (folder / "SOURCE.json").write_text(json.dumps(sources, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return written


def vendor(clone: Path) -> list[Path]:
    written = []
    for prefix, tag, paths in CRD_SOURCES:
        commit = git(clone, "rev-parse", f"{tag}^{{commit}}").decode().strip()
        for path in paths:
            raw = git(clone, "show", f"{tag}:{path}")
            (crd,) = [d for d in yaml.safe_load_all(raw) if d and d.get("kind") == "CustomResourceDefinition"]
            spec = crd["spec"]
            out = {
                "source": {
                    "repository": REPOSITORY,
                    "tag": tag,
                    "commit": commit,
                    "path": path,
                    "sha256": hashlib.sha256(raw).hexdigest(),
                    "license": "Apache-2.0",
                    "transform": "description fields removed",
                },
                "name": crd["metadata"]["name"],
                "group": spec["group"],
                "names": spec["names"],
                "scope": spec["scope"],
                "versions": [
                    {
                        "name": v["name"],
                        "served": v["served"],
                        "storage": v["storage"],
                        "openAPIV3Schema": without_descriptions(v["schema"]["openAPIV3Schema"]),
                    }
                    for v in spec["versions"]
                ],
            }
            target = HERE / f"{prefix}-{tag}" / f"{crd['metadata']['name']}.json"
            target.parent.mkdir(exist_ok=True)
            target.write_text(json.dumps(out, sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")
            written.append(target)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    for written_path in vendor(Path(sys.argv[1])) + vendor_kfp(Path(sys.argv[2])):
        print(written_path.relative_to(HERE))
