"""A stand-in Kubeflow Pipelines API server for tests: real HTTP on 127.0.0.1, state in memory.

No KFP backend can run on a laptop or in CI, so habla's API calls are exercised against this server. It
implements the few v2beta1 REST endpoints habla uses, and checks every request and response body against
the models of ``kfp_server_api`` (the generated client kfp.Client is built on): unknown fields, wrong types
and unknown enum values are rejected with HTTP 400, as a picky server would. Uploaded packages must parse as
a ``PipelineSpec``, and run/recurring-run parameters are checked against the pipeline's declared inputs.

Endpoints: healthz; experiments create/list/get; pipelines create/list, upload, upload_version;
pipeline versions list/get; runs create/list/get; recurringruns create/list/get/delete.

``multi_user=True`` authenticates and authorizes every request but the health check the way the upstream API
server does (kubeflow/pipelines backend/src/apiserver, 2.16.0 and 2.17.0): the identity is the user header the
gateway sets (``KUBEFLOW_USERID_HEADER``/``_PREFIX``: Kubeflow's manifests set ``kubeflow-userid`` and no prefix),
else ``Authorization: Bearer <token>`` (exactly one such header, prefix ``Bearer ``: auth/util.go), reviewed by a
TokenReview for the audience ``pipelines.kubeflow.org`` (auth/authenticator_token_review.go; here ``tokens``: token
-> (user, audiences)); none gives 401. Then a SubjectAccessReview of (namespace, pipelines.kubeflow.org, resource,
verb) for that user alone (resource/resource_manager.go ``IsAuthorized``; here ``authorize``), 403 when denied; the
resource and verb of each call, and the namespace it is checked in, as server/*_server.go take them: experiments
and runs need a namespace (400 without), a run's is its experiment's, a pipeline without one is shared and not
checked, an upload refused for authorization answers 400 (pipeline_upload_server.go). The health check answers
what main.go writes: ``commit_sha``, ``tag_name``, ``multi_user``, ``pipeline_store``.
(No ``from __future__ import annotations`` here: the KFP components below need real annotation types.)
"""

import datetime as dt
import email.parser
import email.policy
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import kfp_server_api
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

API = "/apis/v2beta1"
# int64 fields are strings in the generated models; protobuf JSON accepts numbers for them as well.
INT64_FIELDS = {"max_concurrency", "interval_second", "long_value"}
# Proto enum numbers of PredicateOperation, as kfp.Client sends them (operation 1 = EQUALS).
OPERATIONS = {
    1: "EQUALS",
    2: "NOT_EQUALS",
    3: "GREATER_THAN",
    5: "GREATER_THAN_EQUALS",
    6: "LESS_THAN",
    7: "LESS_THAN_EQUALS",
    8: "IN",
    9: "IS_SUBSTRING",
}
PARAMETER_TYPES = {
    "STRING": (str,),
    "NUMBER_INTEGER": (int,),
    "NUMBER_DOUBLE": (int, float),
    "BOOLEAN": (bool,),
    "STRUCT": (dict,),
    "LIST": (list,),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------- model-based validation


def _model(name: str):
    cls = getattr(kfp_server_api.models, name, None)
    if cls is None:
        raise AssertionError(f"kfp_server_api has no model {name}")
    return cls


def _enum_values(cls) -> set[str]:
    return {v for k, v in vars(cls).items() if k.isupper() and isinstance(v, str)}


def check(value, type_name: str, where: str = "body") -> None:
    """Raise ApiError(400) unless ``value`` (parsed JSON) fits the kfp_server_api type ``type_name``."""
    if value is None:
        return
    if type_name.startswith("list["):
        if not isinstance(value, list):
            raise ApiError(400, f"{where}: expected a list")
        for i, item in enumerate(value):
            check(item, type_name[5:-1], f"{where}[{i}]")
        return
    if type_name.startswith("dict("):
        if not isinstance(value, dict):
            raise ApiError(400, f"{where}: expected an object")
        inner = re.match(r"dict\(([^,]*), (.*)\)", type_name).group(2)
        for key, item in value.items():
            check(item, inner, f"{where}.{key}")
        return
    simple = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "datetime": (str,)}
    if type_name in simple:
        ok = isinstance(value, simple[type_name]) and not (type_name in ("int", "float") and isinstance(value, bool))
        if type_name == "str" and where.rsplit(".", 1)[-1] in INT64_FIELDS:
            ok = isinstance(value, (str, int)) and not isinstance(value, bool)
        if type_name == "datetime" and ok:
            try:
                dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                ok = False
        if not ok:
            raise ApiError(400, f"{where}: expected {type_name}, got {value!r}")
        return
    if type_name == "object":
        return
    cls = _model(type_name)
    if not cls.openapi_types:  # an enum
        if value not in _enum_values(cls):
            raise ApiError(400, f"{where}: {value!r} is not a {type_name} ({sorted(_enum_values(cls))})")
        return
    if not isinstance(value, dict):
        raise ApiError(400, f"{where}: expected a {type_name} object")
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    for key, item in value.items():
        if key not in by_json:
            raise ApiError(400, f"{where}: unknown field {key!r} for {type_name}")
        check(item, cls.openapi_types[by_json[key]], f"{where}.{key}")


class _Raw:
    def __init__(self, data: str):
        self.data = data


def as_model(value: dict, type_name: str):
    """Validate, then deserialize with kfp_server_api's own ApiClient (what kfp.Client does)."""
    check(value, type_name)
    return kfp_server_api.ApiClient().deserialize(_Raw(json.dumps(value)), type_name)


# ----------------------------------------------------------------------------------------------- state


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _snake(key: str) -> str:
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()


def _parse_filter(text: str | None) -> list[tuple[str, str]]:
    """``filter`` query parameter -> [(key, value)] of EQUALS predicates (all the stand-in supports)."""
    if not text:
        return []
    try:
        raw = json.loads(text)
    except ValueError:
        raise ApiError(400, "filter: not JSON") from None
    predicates = []
    for p in raw.get("predicates", []):
        p = {_snake(k): v for k, v in p.items()}
        if isinstance(p.get("operation"), int):
            p["operation"] = OPERATIONS.get(p["operation"], "OPERATION_UNSPECIFIED")
        predicates.append(p)
    check({"predicates": predicates}, "V2beta1Filter", "filter")
    out = []
    for p in predicates:
        if p.get("operation") != "EQUALS" or "string_value" not in p:
            raise ApiError(400, f"filter: the stand-in supports only EQUALS on strings, got {p}")
        out.append((p["key"], p["string_value"]))
    return out


def _check_spec_dict(spec: dict) -> dict:
    try:
        json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    except json_format.ParseError as exc:
        raise ApiError(400, f"invalid pipeline spec: {exc}") from None
    return spec


def _check_parameters(spec: dict, params: dict) -> None:
    declared = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    for name, value in params.items():
        if name not in declared:
            raise ApiError(400, f"runtime_config.parameters: {name!r} is not an input of the pipeline")
        kind = declared[name]["parameterType"]
        ok = isinstance(value, PARAMETER_TYPES[kind]) and not (kind != "BOOLEAN" and isinstance(value, bool))
        if kind == "NUMBER_INTEGER" and isinstance(value, float) and value.is_integer():
            ok = True
        if not ok:
            raise ApiError(400, f"runtime_config.parameters.{name}: {value!r} is not a {kind}")
    for name, decl in declared.items():
        if name not in params and "defaultValue" not in decl and not decl.get("isOptional"):
            raise ApiError(400, f"runtime_config.parameters: required input {name!r} missing")


AUDIENCE = "pipelines.kubeflow.org"
GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6}  # InvalidArgument, Unauthenticated, PermissionDenied, ...


class KfpStandin:
    """The server and its in-memory state. ``run_delay`` slows run creation (to widen race windows).

    Multi-user (see the module doc): ``tokens`` maps a bearer token to ``(user, audiences)``; ``authorize(user,
    namespace, resource, verb)`` answers the SubjectAccessReview (default: deny); ``user_header`` is the gateway's
    identity header and prefix. ``tag_name`` is the release the health check reports.
    """

    def __init__(
        self,
        run_delay: float = 0.0,
        *,
        multi_user: bool = False,
        tokens: dict | None = None,
        authorize=None,
        user_header: tuple[str, str] = ("kubeflow-userid", ""),
        tag_name: str = "2.17.0",
    ):
        self.run_delay = run_delay
        self.multi_user = multi_user
        self.tokens = tokens if tokens is not None else {}  # a live mapping: a TokenRequest stand-in may add to it
        self.authorize = authorize or (lambda user, namespace, resource, verb: False)
        self.user_header = user_header
        self.tag_name = tag_name
        self.reviews: list[tuple[str, str, str, str]] = []  # (user, namespace, resource, verb) asked
        self.lock = threading.Lock()
        self.experiments: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self.specs: dict[str, dict] = {}  # version id -> pipeline spec
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self._server: ThreadingHTTPServer | None = None

    # --------------------------------------------------------------------------------------- lifecycle

    def start(self) -> str:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _serve(self, method: str):
                url = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with standin.lock:
                    standin.requests.append((method, url.path))
                try:
                    status, payload = standin.dispatch(method, url.path, query, body, self.headers)
                except ApiError as exc:
                    status, payload = exc.status, {"code": GRPC_CODES.get(exc.status, 2), "message": str(exc)}
                    check(payload, "GoogleRpcStatus")
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def do_DELETE(self):
                self._serve("DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self):
        self.url = self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------------- routing

    def dispatch(self, method: str, path: str, query: dict, body: bytes, headers) -> tuple[int, dict]:
        if not path.startswith(API):
            raise ApiError(404, f"no route {path}")
        route = path[len(API) :]
        routes = [
            ("GET", r"/healthz", self.healthz, None),
            ("POST", r"/experiments", self.create_experiment, "V2beta1Experiment"),
            ("GET", r"/experiments", self.list_experiments, None),
            ("GET", r"/experiments/([^/:]+)", self.get_experiment, None),
            ("POST", r"/pipelines", self.create_pipeline, "V2beta1Pipeline"),
            ("GET", r"/pipelines", self.list_pipelines, None),
            ("POST", r"/pipelines/upload", self.upload_pipeline, None),
            ("POST", r"/pipelines/upload_version", self.upload_version, None),
            ("GET", r"/pipelines/([^/]+)/versions", self.list_versions, None),
            ("GET", r"/pipelines/([^/]+)/versions/([^/]+)", self.get_version, None),
            ("POST", r"/runs", self.create_run, "V2beta1Run"),
            ("GET", r"/runs", self.list_runs, None),
            ("GET", r"/runs/([^/:]+)", self.get_run, None),
            ("POST", r"/recurringruns", self.create_recurring_run, "V2beta1RecurringRun"),
            ("GET", r"/recurringruns", self.list_recurring_runs, None),
            ("GET", r"/recurringruns/([^/:]+)", self.get_recurring_run, None),
            ("DELETE", r"/recurringruns/([^/:]+)", self.delete_recurring_run, None),
        ]
        for verb, pattern, handler, body_type in routes:
            match = re.fullmatch(pattern, route)
            if verb == method and match:
                args = list(match.groups())
                if body_type:
                    try:
                        parsed = json.loads(body or b"{}")
                    except ValueError:
                        raise ApiError(400, "body: not JSON") from None
                    check(parsed, body_type)
                    args.append(parsed)
                elif route.startswith("/pipelines/upload"):
                    args.append(self._uploaded_spec(body, headers))
                with self.lock:
                    if self.multi_user and handler != self.healthz:
                        self._check_access(handler, args, query, headers)
                    return handler(*args, query=query)
        raise ApiError(404, f"no route {method} {path}")

    # ---------------------------------------------------------------------------------- multi-user auth

    def _identity(self, headers) -> str:
        header, prefix = self.user_header
        if headers.get(header) is not None:
            value = headers.get(header)
            if not value.startswith(prefix):
                raise ApiError(400, f"Header '{header}' is incorrectly formatted. Expected prefix '{prefix}'")
            return value[len(prefix) :]
        values = headers.get_all("Authorization") or []
        if not values:
            raise ApiError(401, "Request header error: there is no user identity header.")
        if len(values) != 1:
            raise ApiError(400, f"Request header error: unexpected number of 'Authorization' headers. Expect 1 "
                                f"got {len(values)}")  # fmt: skip
        if not values[0].startswith("Bearer "):
            raise ApiError(400, "Header 'Authorization' is incorrectly formatted. Expected prefix 'Bearer '")
        review = self.tokens.get(values[0][len("Bearer ") :])
        if review is None:
            raise ApiError(401, "Authentication failure: Review.Status.Authenticated is false")
        user, audiences = review
        if AUDIENCE not in audiences:
            raise ApiError(401, f"Authentication failure: Failed to find all of '[{AUDIENCE}]' in audience: "
                                f"{list(audiences)}")  # fmt: skip
        return user

    def _attributes(self, handler, args, query) -> tuple[str, str, str] | None:
        """(namespace, resource, verb) the upstream server checks for this call; None when it checks nothing."""
        body = args[-1] if args and isinstance(args[-1], dict) else {}
        experiment_ns = lambda eid: (self.experiments.get(eid) or {}).get("namespace", "")  # noqa: E731
        pipeline_ns = lambda pid: (self.pipelines.get(pid) or {}).get("namespace", "")  # noqa: E731
        table = {
            self.create_experiment: ("experiments", "create", lambda: body.get("namespace", "")),
            self.list_experiments: ("experiments", "list", lambda: query.get("namespace", "")),
            self.get_experiment: ("experiments", "get", lambda: experiment_ns(args[0])),
            self.create_pipeline: ("pipelines", "create", lambda: body.get("namespace", "")),
            self.list_pipelines: ("pipelines", "list", lambda: query.get("namespace", "")),
            self.upload_pipeline: ("pipelines", "create", lambda: query.get("namespace", "")),
            self.upload_version: ("pipelines", "create", lambda: pipeline_ns(query.get("pipelineid"))),
            self.list_versions: ("pipelines", "list", lambda: pipeline_ns(args[0])),
            self.get_version: ("pipelines", "get", lambda: pipeline_ns(args[0])),
            self.create_run: ("runs", "create", lambda: experiment_ns(body.get("experiment_id"))),
            self.list_runs: (
                "runs",
                "list",
                lambda: (
                    experiment_ns(query["experiment_id"]) if query.get("experiment_id") else query.get("namespace", "")
                ),
            ),  # fmt: skip
            self.get_run: ("runs", "get", lambda: experiment_ns((self.runs.get(args[0]) or {}).get("experiment_id"))),
            self.create_recurring_run: ("jobs", "create", lambda: experiment_ns(body.get("experiment_id"))),
            self.list_recurring_runs: (
                "jobs",
                "list",
                lambda: (
                    experiment_ns(query["experiment_id"]) if query.get("experiment_id") else query.get("namespace", "")
                ),
            ),  # fmt: skip
            self.get_recurring_run: (
                "jobs",
                "get",
                lambda: experiment_ns((self.recurring_runs.get(args[0]) or {}).get("experiment_id")),
            ),  # fmt: skip
            self.delete_recurring_run: (
                "jobs",
                "delete",
                lambda: experiment_ns((self.recurring_runs.get(args[0]) or {}).get("experiment_id")),
            ),  # fmt: skip
        }
        resource, verb, namespace_of = table[handler]
        namespace = namespace_of()
        if not namespace:
            if resource == "pipelines":
                return None  # a shared pipeline: not checked (canAccessPipeline)
            raise ApiError(400, f"Invalid input error: An {resource[:-1]} cannot have an empty namespace in "
                                "multi-user mode")  # fmt: skip
        return namespace, resource, verb

    def _check_access(self, handler, args, query, headers) -> None:
        uploading = handler in (self.upload_pipeline, self.upload_version)
        try:
            user = self._identity(headers)
            attributes = self._attributes(handler, args, query)
            if attributes is None:
                return
            namespace, resource, verb = attributes
            self.reviews.append((user, namespace, resource, verb))
            if not self.authorize(user, namespace, resource, verb):
                raise ApiError(403, f"PermissionDenied: User '{user}' is not authorized with reason: (request: "
                                    f"&ResourceAttributes{{Namespace:{namespace},Verb:{verb},"
                                    f"Group:{AUDIENCE},Version:v1beta1,Resource:{resource}}})")  # fmt: skip
        except ApiError as exc:
            if uploading and exc.status in (401, 403):
                raise ApiError(400, "Failed to create a pipeline") from None  # what the upload server answers
            raise

    def _reply(self, value: dict, type_name: str) -> tuple[int, dict]:
        as_model(value, type_name)  # the response must deserialize as kfp.Client expects
        return 200, value

    def _list(self, items: list[dict], query: dict, key: str, type_name: str) -> tuple[int, dict]:
        for field_name, wanted in _parse_filter(query.get("filter")):
            items = [i for i in items if i.get(field_name) == wanted]
        sort = query.get("sort_by", "")
        if sort:
            field_name, _, order = sort.partition(" ")
            items = sorted(items, key=lambda i: i.get(field_name, ""), reverse=order == "desc")
        start = int(query.get("page_token") or 0)
        size = int(query.get("page_size") or 10)
        page = items[start : start + size]
        out = {key: page, "total_size": len(items)}
        if start + size < len(items):
            out["next_page_token"] = str(start + size)
        return self._reply(out, type_name)

    # ----------------------------------------------------------------------------------------- health

    def healthz(self, query):
        # main.go writes this JSON itself; the generated model knows only some of its fields
        return 200, {"commit_sha": "standin", "tag_name": self.tag_name, "multi_user": self.multi_user,
                     "pipeline_store": "database"}  # fmt: skip

    # ------------------------------------------------------------------------------------ experiments

    def create_experiment(self, body, query):
        if not body.get("display_name"):
            raise ApiError(400, "experiment display_name is required")
        if any(e["display_name"] == body["display_name"] for e in self.experiments.values()):
            raise ApiError(409, f"experiment {body['display_name']!r} already exists")
        exp = {**body, "experiment_id": str(uuid.uuid4()), "created_at": _now(), "storage_state": "AVAILABLE"}
        self.experiments[exp["experiment_id"]] = exp
        return self._reply(exp, "V2beta1Experiment")

    def _in_namespace(self, items: list[dict], query: dict) -> list[dict]:
        """Multi-user: a list holds the namespace's objects only (single-user: the namespace is ignored)."""
        if not self.multi_user:
            return items
        return [i for i in items if i.get("namespace", "") == query.get("namespace", "")]

    def list_experiments(self, query):
        items = self._in_namespace(list(self.experiments.values()), query)
        return self._list(items, query, "experiments", "V2beta1ListExperimentsResponse")

    def get_experiment(self, experiment_id, query):
        if experiment_id not in self.experiments:
            raise ApiError(404, f"experiment {experiment_id} not found")
        return self._reply(self.experiments[experiment_id], "V2beta1Experiment")

    # -------------------------------------------------------------------------------------- pipelines

    def _uploaded_spec(self, body: bytes, headers) -> dict:
        ctype = headers.get("Content-Type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(400, "upload: expected multipart/form-data")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {ctype}\r\n\r\n".encode() + body
        )
        for part in message.iter_parts():
            if part.get_param("name", header="content-disposition") == "uploadfile":
                try:
                    spec = next(yaml.safe_load_all(part.get_payload(decode=True)))
                except (yaml.YAMLError, StopIteration) as exc:
                    raise ApiError(400, f"uploadfile: not YAML ({exc})") from None
                return _check_spec_dict(spec)
        raise ApiError(400, "upload: no 'uploadfile' part")

    def create_pipeline(self, body, query):
        name = body.get("display_name") or body.get("name")
        if not name:
            raise ApiError(400, "pipeline display_name is required")
        if any(p["display_name"] == name for p in self.pipelines.values()):
            raise ApiError(409, f"pipeline {name!r} already exists")
        pipeline = {**body, "display_name": name, "pipeline_id": str(uuid.uuid4()), "created_at": _now()}
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        return self._reply(pipeline, "V2beta1Pipeline")

    def list_pipelines(self, query):
        items = self._in_namespace(list(self.pipelines.values()), query)
        return self._list(items, query, "pipelines", "V2beta1ListPipelinesResponse")

    def _add_version(self, pipeline_id: str, name: str, spec: dict) -> dict:
        if any(v["pipeline_id"] == pipeline_id and v["display_name"] == name for v in self.versions.values()):
            raise ApiError(409, f"pipeline version {name!r} already exists")
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": str(uuid.uuid4()),
            "display_name": name,
            "created_at": _now(),
            "pipeline_spec": spec,
        }
        self.versions[version["pipeline_version_id"]] = version
        self.specs[version["pipeline_version_id"]] = spec
        return version

    def upload_pipeline(self, spec, query):
        name = query.get("display_name") or query.get("name") or spec["pipelineInfo"]["name"]
        status, pipeline = self.create_pipeline(
            {"display_name": name, **({"namespace": query["namespace"]} if query.get("namespace") else {})}, query
        )
        self._add_version(pipeline["pipeline_id"], pipeline["display_name"], spec)
        return status, pipeline

    def upload_version(self, spec, query):
        pipeline_id = query.get("pipelineid")
        if pipeline_id not in self.pipelines:
            raise ApiError(404, f"pipeline {pipeline_id} not found")
        name = query.get("display_name") or query.get("name") or spec["pipelineInfo"]["name"]
        return self._reply(self._add_version(pipeline_id, name, spec), "V2beta1PipelineVersion")

    def list_versions(self, pipeline_id, query):
        if pipeline_id not in self.pipelines:
            raise ApiError(404, f"pipeline {pipeline_id} not found")
        items = [v for v in self.versions.values() if v["pipeline_id"] == pipeline_id]
        return self._list(items, query, "pipeline_versions", "V2beta1ListPipelineVersionsResponse")

    def get_version(self, pipeline_id, version_id, query):
        version = self.versions.get(version_id)
        if not version or version["pipeline_id"] != pipeline_id:
            raise ApiError(404, f"pipeline version {version_id} not found")
        return self._reply(version, "V2beta1PipelineVersion")

    def _resolve_spec(self, body: dict) -> dict:
        if body.get("experiment_id") not in self.experiments:
            raise ApiError(400, f"experiment {body.get('experiment_id')!r} not found")
        ref = body.get("pipeline_version_reference")
        if ref:
            version = self.versions.get(ref.get("pipeline_version_id", ""))
            if not version or version["pipeline_id"] != ref.get("pipeline_id"):
                raise ApiError(400, f"pipeline version {ref} not found")
            spec = self.specs[version["pipeline_version_id"]]
        elif body.get("pipeline_spec"):
            spec = body["pipeline_spec"].get("pipeline_spec", body["pipeline_spec"])
            _check_spec_dict(spec)
        else:
            raise ApiError(400, "neither pipeline_version_reference nor pipeline_spec given")
        _check_parameters(spec, (body.get("runtime_config") or {}).get("parameters") or {})
        return spec

    # ------------------------------------------------------------------------------------------- runs

    def create_run(self, body, query):
        self._resolve_spec(body)
        if self.run_delay:
            self.lock.release()  # let concurrent requests in while this one is "slow"
            try:
                time.sleep(self.run_delay)
            finally:
                self.lock.acquire()
        run = {
            **body,
            "run_id": str(uuid.uuid4()),
            "created_at": _now(),
            "state": "PENDING",
            "storage_state": "AVAILABLE",
        }
        self.runs[run["run_id"]] = run
        return self._reply(run, "V2beta1Run")

    def list_runs(self, query):
        items = [
            r
            for r in self.runs.values()
            if not query.get("experiment_id") or r["experiment_id"] == query["experiment_id"]
        ]
        return self._list(items, query, "runs", "V2beta1ListRunsResponse")

    def get_run(self, run_id, query):
        if run_id not in self.runs:
            raise ApiError(404, f"run {run_id} not found")
        return self._reply(self.runs[run_id], "V2beta1Run")

    # --------------------------------------------------------------------------------- recurring runs

    def create_recurring_run(self, body, query):
        self._resolve_spec(body)
        cron = ((body.get("trigger") or {}).get("cron_schedule") or {}).get("cron", "")
        if len(cron.split()) != 6:
            raise ApiError(400, f"cron {cron!r}: KFP expects 6 fields, seconds first")
        if not 1 <= int(body.get("max_concurrency") or 1) <= 10:
            raise ApiError(400, "max_concurrency must be between 1 and 10")
        rr = {
            **body,
            "recurring_run_id": str(uuid.uuid4()),
            "created_at": _now(),
            "updated_at": _now(),
            "status": "ENABLED" if body.get("mode") == "ENABLE" else "DISABLED",
        }
        self.recurring_runs[rr["recurring_run_id"]] = rr
        return self._reply(rr, "V2beta1RecurringRun")

    def list_recurring_runs(self, query):
        items = [
            r
            for r in self.recurring_runs.values()
            if not query.get("experiment_id") or r["experiment_id"] == query["experiment_id"]
        ]
        # The one camelCase JSON name of the API (attribute_map of ListRecurringRunsResponse).
        return self._list(items, query, "recurringRuns", "V2beta1ListRecurringRunsResponse")

    def get_recurring_run(self, recurring_run_id, query):
        if recurring_run_id not in self.recurring_runs:
            raise ApiError(404, f"recurring run {recurring_run_id} not found")
        return self._reply(self.recurring_runs[recurring_run_id], "V2beta1RecurringRun")

    def delete_recurring_run(self, recurring_run_id, query):
        if self.recurring_runs.pop(recurring_run_id, None) is None:
            raise ApiError(404, f"recurring run {recurring_run_id} not found")
        return 200, {}


# -------------------------------------------------------------------------------- helpers for the tests


def compile_fake_training_pipeline(out_dir: str) -> str:
    """A stand-in for the training pipeline with its agreed interface (release_uri, output_uri, locale, …)."""
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
    def train(release_uri: str, output_uri: str, locale: str, config: str, nodes: int, max_steps: int) -> str:
        return output_uri

    @dsl.pipeline(name="habla-training")
    def training(
        release_uri: str,
        output_uri: str,
        locale: str = "es",
        config: str = "small",
        nodes: int = 1,
        max_steps: int = 1000,
        run_name: str = "",
    ):
        train(
            release_uri=release_uri,
            output_uri=output_uri,
            locale=locale,
            config=config,
            nodes=nodes,
            max_steps=max_steps,
        )

    path = f"{out_dir}/training_pipeline.yaml"
    compiler.Compiler().compile(training, package_path=path)
    return path
