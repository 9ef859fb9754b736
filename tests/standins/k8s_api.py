"""A stand-in Kubernetes API server for the launcher tests: a real HTTP server on 127.0.0.1.

It serves only what habla.kubeflow.follow calls -- create/get/delete of TrainJobs and PyTorchJobs, pod listing by
label and pod logs -- and moves each job through a scripted list of conditions, one step per GET, so that
tests see Created -> Running -> Succeeded (or -> Failed) the way a controller would report them. Every
request is recorded (method, path, query, JSON body) for the tests to inspect.

It also stores ``coordination.k8s.io/v1`` Leases (what habla.kubeflow.lease calls: get, create, replace) with
the API server's optimistic concurrency, as implemented upstream (kubernetes/kubernetes):

- every write bumps one global ``resourceVersion`` (etcd's revision), returned as an opaque string;
- create of an existing name: 409 ``AlreadyExists`` (registry/generic/registry/store.go ``Create``);
- replace (PUT) naming a ``resourceVersion`` other than the stored one: 409 ``Conflict``, "the object has been
  modified; please apply your changes to the latest version and try again" (store.go ``Update``,
  ``OptimisticLockErrorMsg``); without one: 422 ``Invalid``, "must be specified for an update", because the
  Lease strategy has ``AllowUnconditionalUpdate() == false`` (pkg/registry/coordination/lease/strategy.go);
- replace of a missing Lease creates it (``AllowCreateOnUpdate() == true``) unless the body names a ``uid``,
  whose precondition then fails with 409 (``rest.DefaultUpdatedObjectInfo`` preconditions);
- ``acquireTime``/``renewTime`` are ``MicroTime``: parsed with layout ``2006-01-02T15:04:05.000000Z07:00``
  (apimachinery meta/v1 micro_time.go), so anything but six fractional digits is a 400;
- ``leaseDurationSeconds`` must be > 0 and ``leaseTransitions`` >= 0 (pkg/apis/coordination/validation): 422.

Also what the launcher's safety nets call: a pod by name (the step's own, for its uid), a JSON merge patch of a job
(``application/merge-patch+json``, RFC 7386: the only patch the stand-in takes, as the client sends for custom
objects), PodDisruptionBudgets (``policy/v1``, validated against the Kubernetes schema with kubernetes-validate,
strictly, 422 otherwise; deleted with the job that owns them, as the garbage collector would), and TokenRequests
(``serviceaccounts/<name>/token``: 403 unless the account is in ``token_accounts``; the token it hands out is
recorded in ``issued`` with the user and audiences a TokenReview of it would report).

No cluster can run on the development machine or in CI, so this is what the launcher is tested against.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

JOB_PATH = re.compile(
    r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$"
)
PODS_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods$")
LOG_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<pod>[^/]+)/log$")

SERVED = {("trainer.kubeflow.org", "v1alpha1", "trainjobs"), ("kubeflow.org", "v1", "pytorchjobs")}
LEASES = ("coordination.k8s.io", "v1", "leases")
PDBS = ("policy", "v1", "poddisruptionbudgets")
POD_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<pod>[^/]+)$")
TOKEN_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/serviceaccounts/(?P<sa>[^/]+)/token$")
MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
OPTIMISTIC_LOCK = "the object has been modified; please apply your changes to the latest version and try again"
POD_LABELS = {"trainjobs": "jobset.sigs.k8s.io/jobset-name", "pytorchjobs": "training.kubeflow.org/job-name"}
# The pod phase a job's pods show while the job's last condition is ...
POD_PHASE = {
    "": "Pending",
    "Created": "Pending",
    "Running": "Running",
    "Complete": "Succeeded",
    "Succeeded": "Succeeded",
    "Failed": "Failed",
}


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


@dataclass
class StandinK8s:
    """Run with ``with StandinK8s(steps=[...]) as api:``; ``api.url`` is the server to point a client at.

    ``steps``: the condition type each successive GET of a job reports ("" = no condition yet); the last one
    repeats. ``missing``: plurals answered 404 (CRD not installed). ``forbidden``: plurals answered 403.
    ``flaky_gets``: this many GETs of a job answer 503 before the real ones (API server restarting).
    """

    steps: list[str] = field(default_factory=lambda: ["Created", "Running", "Succeeded"])
    nodes: int = 2
    missing: set[str] = field(default_factory=set)
    forbidden: set[str] = field(default_factory=set)
    flaky_gets: int = 0
    pod_log: str = "epoch 0 loss 1.0\nRuntimeError: CUDA out of memory\n"
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    _gets: dict[tuple[str, str, str], int] = field(default_factory=dict)
    _frozen: set[tuple[str, str, str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    leases: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    revision: int = 1000
    # Pods that exist by name (namespace, name) -> uid: what a pipeline step reads of its own pod.
    own_pods: dict[tuple[str, str], str] = field(default_factory=dict)
    # TokenRequest (authentication.k8s.io/v1, the serviceaccounts/token subresource): accounts that may have one,
    # and the tokens handed out: token -> (user, audiences), what a TokenReview of it would say.
    token_accounts: set[tuple[str, str]] = field(default_factory=set)
    issued: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    budgets: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> StandinK8s:  # noqa: PYI034 - a dataclass, never subclassed
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _serve(self, method: str) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                with standin._lock:
                    standin.requests.append(Recorded(method, parts.path, parse_qs(parts.query), body))
                    code, payload = standin._route(method, parts.path, parse_qs(parts.query), body)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_DELETE(self) -> None:
                self._serve("DELETE")

            def do_PUT(self) -> None:
                self._serve("PUT")

            def do_PATCH(self) -> None:
                if self.headers.get("Content-Type") != "application/merge-patch+json":
                    self.send_response(415)  # the only patch the stand-in takes (RFC 7386)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._serve("PATCH")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def kubeconfig(self, path: Any, namespace: str = "default") -> str:
        """Write a kubeconfig that points a client (another process: KUBECONFIG=path) at this server."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {"token": "standin-token"}}],
            "contexts": [
                {"name": "standin", "context": {"cluster": "standin", "user": "standin", "namespace": namespace}}
            ],
            "current-context": "standin",
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f)  # JSON is YAML
        return str(path)

    def api_client(self) -> Any:
        """A kubernetes ApiClient pointed at this server (no credentials, no TLS)."""
        from kubernetes import client

        configuration = client.Configuration(host=self.url)
        return client.ApiClient(configuration)

    # -------------------------------------------------------------------------------------- helpers

    def put(
        self,
        plural: str,
        namespace: str,
        obj: dict[str, Any],
        step: int = 0,
        status: dict[str, Any] | None = None,
    ) -> None:
        """Make a job exist already (an earlier attempt): at ``step`` of the script, or with a fixed ``status``."""
        key = (plural, namespace, obj["metadata"]["name"])
        self.objects[key] = self._stored(obj, namespace)
        self._gets[key] = step
        if status is not None:
            self.objects[key]["status"] = status
            self._frozen.add(key)

    def calls(self, method: str, plural: str | None = None) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and (plural is None or f"/{plural}" in r.path)]

    @staticmethod
    def _status(code: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
        return code, {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "reason": reason,
            "message": message,
            "code": code,
        }

    @staticmethod
    def _stored(body: dict[str, Any], namespace: str) -> dict[str, Any]:
        obj = json.loads(json.dumps(body))
        obj["metadata"].setdefault("namespace", namespace)
        obj["metadata"]["uid"] = f"uid-{obj['metadata']['name']}"
        obj["status"] = {}
        return obj

    def _current(self, key: tuple[str, str, str]) -> str:
        return self.steps[min(self._gets.get(key, 0), len(self.steps)) - 1] if self._gets.get(key) else ""

    def _advance(self, key: tuple[str, str, str]) -> dict[str, Any]:
        """One GET: move the job one step along the script and write its conditions."""
        self._gets[key] = self._gets.get(key, 0) + 1
        step = self.steps[min(self._gets[key], len(self.steps)) - 1]
        obj = self.objects[key]
        seen = []
        for s in self.steps[: min(self._gets[key], len(self.steps))]:
            if s and s not in seen:
                seen.append(s)
        obj["status"] = {
            "conditions": [
                {
                    "type": t,
                    "status": "True" if t == step else "False",
                    "reason": f"Job{t}",
                    "message": f"job {key[2]} is {t.lower()}",
                    "lastTransitionTime": "2025-01-01T00:00:00Z",
                }
                for t in seen
            ]
        }
        return obj

    # --------------------------------------------------------------------------------------- routes

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        if (m := JOB_PATH.match(path)) and (m["group"], m["version"], m["plural"]) == LEASES:
            if "leases" in self.forbidden:
                return self._status(403, "Forbidden", f"leases.coordination.k8s.io is forbidden in namespace {m['ns']}")
            return self._leases(method, m["ns"], m["name"], body)
        if (m := JOB_PATH.match(path)) and (m["group"], m["version"], m["plural"]) == PDBS:
            return self._budgets(method, m["ns"], m["name"], body)
        if m := JOB_PATH.match(path):
            return self._jobs(method, m["group"], m["version"], m["ns"], m["plural"], m["name"], body)
        if (m := TOKEN_PATH.match(path)) and method == "POST":
            return self._token_request(m["ns"], m["sa"], body)
        if (m := POD_PATH.match(path)) and method == "GET":
            uid = self.own_pods.get((m["ns"], m["pod"]))
            if uid is None:
                return self._status(404, "NotFound", f'pods "{m["pod"]}" not found')
            return 200, {"kind": "Pod", "apiVersion": "v1", "metadata": {"name": m["pod"], "namespace": m["ns"],
                                                                          "uid": uid}}  # fmt: skip
        if (m := PODS_PATH.match(path)) and method == "GET":
            return 200, self._pods(m["ns"], (query.get("labelSelector") or [""])[0])
        if (m := LOG_PATH.match(path)) and method == "GET":
            return 200, self.pod_log
        return self._status(404, "NotFound", f"the server could not find the requested resource {path}")

    def _jobs(
        self, method: str, group: str, version: str, ns: str, plural: str, name: str | None, body: Any
    ) -> tuple[int, Any]:
        if (group, version, plural) not in SERVED or plural in self.missing:
            return self._status(404, "NotFound", "the server could not find the requested resource")
        if plural in self.forbidden:
            return self._status(
                403,
                "Forbidden",
                f'{plural}.{group} is forbidden: User "system:serviceaccount:'
                f'{ns}:default" cannot {method.lower()} resource "{plural}"',
            )
        if method == "POST" and name is None:
            key = (plural, ns, body["metadata"]["name"])
            if key in self.objects:
                return self._status(409, "AlreadyExists", f'{plural} "{key[2]}" already exists')
            self.objects[key] = self._stored(body, ns)
            self._gets[key] = 0
            return 201, self.objects[key]
        key = (plural, ns, name or "")
        if key not in self.objects:
            return self._status(404, "NotFound", f'{plural} "{name}" not found')
        if method == "GET":
            if self.flaky_gets:
                self.flaky_gets -= 1
                return self._status(503, "ServiceUnavailable", "the server is currently unable to handle the request")
            return 200, self.objects[key] if key in self._frozen else self._advance(key)
        if method == "DELETE":
            del self.objects[key]
            self._frozen.discard(key)
            # The garbage collector deletes what the job owned (its PodDisruptionBudget).
            uid = f"uid-{name}"
            for pdb in [k for k, b in self.budgets.items() if uid in _owner_uids(b)]:
                del self.budgets[pdb]
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        if method == "PATCH":
            self.objects[key] = _merge_patch(self.objects[key], body)
            return 200, self.objects[key]
        return self._status(405, "MethodNotAllowed", method)

    def _token_request(self, ns: str, name: str, body: Any) -> tuple[int, Any]:
        """A TokenRequest for a service account: 403 unless allowed (``token_accounts``), else a token for the
        audiences asked (the API server's default audience when none), valid for ``expirationSeconds``."""
        if (ns, name) not in self.token_accounts:
            return self._status(403, "Forbidden", f'serviceaccounts "{name}" is forbidden: User cannot create '
                                                  f'resource "serviceaccounts/token" in namespace "{ns}"')  # fmt: skip
        if (body or {}).get("kind") != "TokenRequest" or (body or {}).get("apiVersion") != "authentication.k8s.io/v1":
            return self._status(400, "BadRequest", "expected an authentication.k8s.io/v1 TokenRequest")
        spec = body.get("spec") or {}
        audiences = spec.get("audiences") or ["https://kubernetes.default.svc"]
        token = f"token-{len(self.issued) + 1}-{name}"
        self.issued[token] = (f"system:serviceaccount:{ns}:{name}", audiences)
        return 201, {**body, "status": {"token": token, "expirationTimestamp": "2099-01-01T00:00:00Z"}}

    def _budgets(self, method: str, ns: str, name: str | None, body: Any) -> tuple[int, Any]:
        """PodDisruptionBudgets, validated against the Kubernetes schema (policy/v1) as the API server would."""
        if method == "POST" and name is None:
            from kubernetes_validate import validate
            from kubernetes_validate.utils import ValidationError

            try:
                validate(body, "1.33", strict=True)
            except ValidationError as exc:
                return self._status(422, "Invalid", str(exc).splitlines()[0])
            key = (ns, body["metadata"]["name"])
            if key in self.budgets:
                return self._status(409, "AlreadyExists", f'poddisruptionbudgets.policy "{key[1]}" already exists')
            self.budgets[key] = json.loads(json.dumps(body))
            return 201, self.budgets[key]
        if method == "GET" and (ns, name or "") in self.budgets:
            return 200, self.budgets[(ns, name or "")]
        return self._status(404, "NotFound", f'poddisruptionbudgets.policy "{name}" not found')

    def _pods(self, ns: str, selector: str) -> dict[str, Any]:
        label, _, job = selector.partition("=")
        items = []
        for plural, namespace, name in self.objects:
            if namespace != ns or name != job or POD_LABELS[plural] != label:
                continue
            step = self._current((plural, namespace, name))
            for i in range(self.nodes):
                phase = POD_PHASE.get(step, "Running")
                if step == "Failed" and i > 0:
                    phase = "Running"  # one node fails; the others are still up until cleanup
                items.append(
                    {
                        "metadata": {"name": f"{name}-node-{i}", "namespace": ns, "labels": {label: name}},
                        "status": {"phase": phase},
                    }
                )
        return {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}

    # ---------------------------------------------------------------------------------------- leases

    def _lease_invalid(self, name: str, body: Any, namespace: str) -> tuple[int, Any] | None:
        """What the API server answers to a malformed Lease (decoding 400, validation 422), or None."""
        if not isinstance(body, dict) or (body.get("apiVersion"), body.get("kind")) != (
            "coordination.k8s.io/v1",
            "Lease",
        ):
            return self._status(400, "BadRequest", "expected a coordination.k8s.io/v1 Lease")
        meta, spec = body.get("metadata") or {}, body.get("spec") or {}
        if meta.get("namespace", namespace) != namespace:
            return self._status(400, "BadRequest", "the namespace of the provided object does not match the request")
        for key in ("acquireTime", "renewTime"):
            if spec.get(key) is not None and not MICRO_TIME.match(str(spec[key])):
                layout = "2006-01-02T15:04:05.000000Z07:00"
                return self._status(400, "BadRequest", f'parsing time "{spec[key]}" as "{layout}"')
        problems = []
        if not DNS_SUBDOMAIN.match(name) or len(name) > 253:
            problems.append(f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain")
        if spec.get("leaseDurationSeconds") is not None and int(spec["leaseDurationSeconds"]) <= 0:
            problems.append("spec.leaseDurationSeconds: Invalid value: must be greater than 0")
        if spec.get("leaseTransitions") is not None and int(spec["leaseTransitions"]) < 0:
            problems.append("spec.leaseTransitions: Invalid value: must be greater than or equal to 0")
        if problems:
            return self._status(422, "Invalid", f'Lease.coordination.k8s.io "{name}" is invalid: {"; ".join(problems)}')
        return None

    def _lease_store(self, namespace: str, name: str, body: dict, uid: str, created: str) -> dict[str, Any]:
        self.revision += 1
        obj = json.loads(json.dumps(body))
        obj["metadata"].update(
            namespace=namespace, uid=uid, resourceVersion=str(self.revision), creationTimestamp=created
        )
        for key in ("acquireTime", "renewTime"):  # the server writes MicroTime back in UTC
            value = obj["spec"].get(key)
            if value and not value.endswith("Z"):
                import datetime as dt

                t = dt.datetime.fromisoformat(value).astimezone(dt.timezone.utc)
                obj["spec"][key] = t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.leases[(namespace, name)] = obj
        return obj

    def _leases(self, method: str, ns: str, name: str | None, body: Any) -> tuple[int, Any]:
        if method == "POST" and name is None:
            name = ((body or {}).get("metadata") or {}).get("name", "")
            if bad := self._lease_invalid(name, body, ns):
                return bad
            if (ns, name) in self.leases:
                return self._status(409, "AlreadyExists", f'leases.coordination.k8s.io "{name}" already exists')
            if body["metadata"].get("resourceVersion"):
                return self._status(500, "InternalError", "resourceVersion should not be set on objects to be created")
            return 201, self._lease_store(ns, name, body, f"uid-{self.revision + 1}", "2025-01-01T00:00:00Z")
        if name is None:
            return self._status(405, "MethodNotAllowed", method)
        current = self.leases.get((ns, name))
        if method == "GET":
            if current is None:
                return self._status(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found')
            return 200, current
        if method == "PUT":
            if bad := self._lease_invalid(name, body, ns):
                return bad
            meta = body["metadata"]
            if meta.get("name") != name:
                return self._status(400, "BadRequest", "the name of the object does not match the name on the URL")
            if current is None:
                if meta.get("uid"):
                    return self._status(
                        409, "Conflict", f"Precondition failed: UID in precondition: {meta['uid']}, UID in object meta:"
                    )
                return 201, self._lease_store(ns, name, body, f"uid-{self.revision + 1}", "2025-01-01T00:00:00Z")
            if meta.get("uid") and meta["uid"] != current["metadata"]["uid"]:
                return self._status(409, "Conflict", "Precondition failed: UID in precondition does not match")
            if not meta.get("resourceVersion"):
                return self._status(
                    422,
                    "Invalid",
                    f'leases.coordination.k8s.io "{name}" is invalid: metadata.resourceVersion: Invalid value: 0x0: '
                    "must be specified for an update",
                )
            if meta["resourceVersion"] != current["metadata"]["resourceVersion"]:
                return self._status(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on leases.coordination.k8s.io "{name}": {OPTIMISTIC_LOCK}',
                )
            return 200, self._lease_store(
                ns, name, body, current["metadata"]["uid"], current["metadata"]["creationTimestamp"]
            )
        return self._status(405, "MethodNotAllowed", method)


def _owner_uids(obj: dict[str, Any]) -> list[str]:
    return [ref.get("uid") for ref in (obj.get("metadata") or {}).get("ownerReferences") or []]


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what ``application/merge-patch+json`` means to the API server): objects merge
    key by key, null deletes, anything else (lists included) replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out
