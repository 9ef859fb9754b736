"""Validate custom resources against the vendored upstream CRDs (tests/kubeflow/upstream/) the way a strict
``kubectl apply`` (``--validate=strict``, server-side field validation ``Strict``) does.

A CRD's ``openAPIV3Schema`` is a *structural* schema: the API server prunes every field its schema does not
name, and strict field validation reports each pruned field as an error ("unknown field"). JSON Schema allows
extra properties by default, so :func:`strict_schema` turns the CRD schema into a JSON Schema that refuses
them, following the Kubernetes rules for structural schemas
(https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#specifying-a-structural-schema):

- an ``object`` keeps only its ``properties``, unless ``x-kubernetes-preserve-unknown-fields: true`` (anything
  kept) or ``additionalProperties`` (a map) is given;
- ``x-kubernetes-int-or-string: true``: an integer or a string; ``nullable: true``: null allowed too;
- ``metadata`` of the object itself and of an ``x-kubernetes-embedded-resource`` is an ObjectMeta, checked
  against the Kubernetes schema of ObjectMeta (kubernetes-validate, strict) like the API server does;
  ``apiVersion`` and ``kind`` are implied there.

CEL rules (``x-kubernetes-validations``) are not evaluated here; :func:`cel_rules` lists those that apply
to an object, so that tests can pin the ones habla relies on.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
from kubernetes_validate import validate as k8s_validate

UPSTREAM = Path(__file__).resolve().parent / "upstream"
K8S_VERSION = "1.33"
TRAINER_VERSIONS = ("v2.0.0", "v2.1.0", "v2.2.0", "v2.3.0")
TRAINING_OPERATOR_VERSIONS = ("v1.9.4",)

_IMPLIED = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}


@functools.cache
def load(release: str, crd: str) -> dict[str, Any]:
    """A vendored CRD: ``load("trainer-v2.3.0", "trainjobs.trainer.kubeflow.org")``."""
    return json.loads((UPSTREAM / release / f"{crd}.json").read_text(encoding="utf-8"))


def releases() -> list[str]:
    """The vendored releases with CRDs: ``trainer-v2.0.0`` ... ``training-operator-v1.9.4``."""
    return sorted({p.parent.name for p in UPSTREAM.glob("*/*.kubeflow.org.json")})


def crd_for(release: str, api_version: str, kind: str) -> dict[str, Any] | None:
    """The vendored CRD of ``release`` serving ``api_version``/``kind``, or None."""
    group, _, version = api_version.rpartition("/")
    for path in sorted((UPSTREAM / release).glob("*.kubeflow.org.json")):
        crd = load(release, path.stem)
        if crd["group"] == group and crd["names"]["kind"] == kind:
            if any(v["name"] == version and v["served"] for v in crd["versions"]):
                return crd
    return None


def strict_schema(node: dict[str, Any], *, resource: bool = False) -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) that accepts what the structural schema ``node`` accepts, no unknown field."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key == "items":
            out[key] = strict_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [strict_schema(sub) for sub in value]
        elif key == "not":
            out[key] = strict_schema(value)
        elif key == "additionalProperties":
            out[key] = value if isinstance(value, bool) else strict_schema(value)
        elif key.startswith("x-kubernetes-") or key in ("nullable", "default", "format", "example", "description"):
            continue  # Kubernetes extensions (handled below); defaults and formats are not validation
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    embedded = resource or node.get("x-kubernetes-embedded-resource")
    if embedded:
        properties = out.setdefault("properties", {})
        for name, schema in _IMPLIED.items():
            properties.setdefault(name, schema)
        out["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by check_object_meta
    if (
        node.get("type") == "object"
        and not node.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in node
    ):
        out["additionalProperties"] = False  # strict field validation: every field the schema does not name
    return out


@functools.cache
def _validator(release: str, crd_name: str, version: str) -> jsonschema.Draft202012Validator:
    crd = load(release, crd_name)
    (served,) = [v for v in crd["versions"] if v["name"] == version]
    schema = strict_schema(served["openAPIV3Schema"], resource=True)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _embedded_metadata(schema: dict[str, Any], obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, dict]]:
    """(path, metadata) of every embedded resource inside ``obj`` (the root's own metadata excluded)."""
    if not isinstance(obj, dict | list):
        return
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from _embedded_metadata(schema.get("items") or {}, item, (*path, i))
        return
    if path and schema.get("x-kubernetes-embedded-resource") and isinstance(obj.get("metadata"), dict):
        yield path, obj["metadata"]
    for name, value in obj.items():
        sub = (schema.get("properties") or {}).get(name)
        if sub is None and isinstance(schema.get("additionalProperties"), dict):
            sub = schema["additionalProperties"]
        if sub is not None:
            yield from _embedded_metadata(sub, value, (*path, name))


def check_object_meta(metadata: dict[str, Any], where: str = "metadata") -> list[str]:
    """Errors of an ObjectMeta against Kubernetes' own schema (strict: unknown fields are errors)."""
    try:
        k8s_validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata}, K8S_VERSION, strict=True)
    except Exception as exc:  # noqa: BLE001 - kubernetes_validate.ValidationError carries the message
        return [f"{where}: {getattr(exc, 'message', exc)}"]
    return []


def errors(obj: dict[str, Any], release: str) -> list[str]:
    """Every reason a strict ``kubectl apply`` of ``obj`` would fail on a cluster running ``release``'s CRDs.

    An empty list means valid. A kind the release does not serve is an error of its own.
    """
    crd = crd_for(release, obj.get("apiVersion", ""), obj.get("kind", ""))
    if crd is None:
        return [f"{release} serves no {obj.get('kind')} in {obj.get('apiVersion')}"]
    version = obj["apiVersion"].rpartition("/")[2]
    found = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in sorted(_validator(release, crd["name"], version).iter_errors(obj), key=lambda e: list(e.path))
    ]
    found += check_object_meta(obj.get("metadata") or {})
    (served,) = [v for v in crd["versions"] if v["name"] == version]
    for path, meta in _embedded_metadata(served["openAPIV3Schema"], obj):
        found += check_object_meta(meta, ".".join(str(p) for p in (*path, "metadata")))
    namespaced = crd["scope"] == "Namespaced"
    if not namespaced and "namespace" in (obj.get("metadata") or {}):
        found.append(f"metadata.namespace: {crd['names']['kind']} is cluster-scoped")
    return found


def cel_rules(obj: dict[str, Any], release: str) -> list[tuple[str, str]]:
    """(path, rule) of every CEL rule of the CRD schema that applies to a field present in ``obj``."""
    crd = crd_for(release, obj["apiVersion"], obj["kind"])
    (served,) = [v for v in crd["versions"] if v["name"] == obj["apiVersion"].rpartition("/")[2]]
    found: list[tuple[str, str]] = []

    def walk(schema: dict[str, Any], value: Any, path: str) -> None:
        found.extend((path or "<root>", r["rule"]) for r in schema.get("x-kubernetes-validations") or [])
        if isinstance(value, dict):
            for name, sub_value in value.items():
                sub = (schema.get("properties") or {}).get(name)
                if sub is None and isinstance(schema.get("additionalProperties"), dict):
                    sub = schema["additionalProperties"]
                if sub is not None:
                    walk(sub, sub_value, f"{path}.{name}" if path else name)
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                walk(schema["items"], item, f"{path}[{i}]")

    walk(served["openAPIV3Schema"], obj, "")
    return found
