"""Reaching a Kubeflow Pipelines API, standalone or multi-user: which token to send, which namespace to work in,
and whether the server is one habla supports.

A multi-user KFP API server (Kubeflow's profiles, Istio, Dex/oauth2-proxy in front) identifies every request but its
health check by a user header set by the gateway (``kubeflow-userid``) or, from inside the cluster, by
``Authorization: Bearer <token>``: a Kubernetes service account token it checks with a TokenReview for the audience
``pipelines.kubeflow.org``; it then asks for a SubjectAccessReview on ``pipelines.kubeflow.org`` resources in the
namespace (kubeflow/pipelines backend/src/apiserver/auth/ and resource/resource_manager.go ``IsAuthorized``, 2.16
and 2.17). ``kfp.Client`` sends no token when given an explicit host unless it is handed one, so
:func:`credentials` finds it, in this order:

1. ``--token-file FILE`` (read again before each request: a projected token the kubelet renews, or one made by
   ``kubectl create token ACCOUNT --audience pipelines.kubeflow.org``);
2. ``$HABLA_KFP_TOKEN`` (the token itself, for a shell or CI; never put it on a command line);
3. the projected token kfp.Client itself looks for in a pod: ``$KF_PIPELINES_SA_TOKEN_PATH``, else
   ``/var/run/secrets/kubeflow/pipelines/token`` (the CronJob in manifests/cronjob mounts it there);
4. in a pod, against a multi-user server, a token of the pod's own service account requested from the Kubernetes
   API (TokenRequest; a KFP step cannot mount a projected token), renewed before it expires.

No token is ever logged or written anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from habla.core.errors import Fault, HablaError

log = logging.getLogger(__name__)

AUDIENCE = "pipelines.kubeflow.org"  # the API server's TOKEN_REVIEW_AUDIENCE default (common/const.go)
TOKEN_ENV = "HABLA_KFP_TOKEN"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp.Client's own variable (kfp.client.KF_PIPELINES_SA_TOKEN_ENV)
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"  # kfp.Client's default (KF_PIPELINES_SA_TOKEN_PATH)
# KFP 2.15 and older fail habla's pipeline at run time (docs/operators.md, Compatibility).
OLDEST_SUPPORTED = (2, 16)
TOKEN_HINT = (
    f"give a token for the audience {AUDIENCE}: --token-file FILE or ${TOKEN_ENV} (kubectl create token ACCOUNT "
    f"--audience {AUDIENCE}), and grant its account the Role habla-kfp-client in the namespace (manifests/base)"
)


@dataclass(frozen=True)
class Server:
    """What the API's health check says (``/apis/v2beta1/healthz``: backend/src/apiserver/main.go)."""

    tag: str  # the release, e.g. "2.17.0"; "unknown" when the image was built without one
    multi_user: bool


class _Redirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect is an answer here (a login page), never followed


def token_source(token_file: str | None = None) -> tuple[str, str] | None:
    """``("file", path)`` or ``("value", token)`` per the module's order 1-3, or None."""
    if token_file:
        if not Path(token_file).is_file():
            raise HablaError(f"--token-file {token_file}: no such file")
        return "file", token_file
    if os.environ.get(TOKEN_ENV, "").strip():
        return "value", os.environ[TOKEN_ENV].strip()
    path = os.environ.get(SA_TOKEN_PATH_ENV) or SA_TOKEN_PATH
    if Path(path).is_file():
        return "file", path
    return None


def read_token(source: tuple[str, str] | None) -> str | None:
    if source is None:
        return None
    kind, value = source
    if kind == "value":
        return value
    try:
        return Path(value).read_text(encoding="ascii").strip()
    except (OSError, UnicodeError) as exc:
        raise HablaError(f"cannot read the KFP token file {value}: {exc.__class__.__name__}") from None


def check_server(host: str, token: str | None, timeout: float) -> Server:
    """The server's health check, fetched with the token and without following redirects: one line when nothing
    answers, when a login page answers instead (no or a wrong token), or when the release is older than 2.16."""
    url = f"{host}/apis/v2beta1/healthz"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    opener = urllib.request.build_opener(_Redirects)
    try:
        with opener.open(request, timeout=timeout) as answer:
            body = answer.read(65536)
    except urllib.error.HTTPError as exc:
        if exc.code in (301, 302, 303, 307, 308):
            where = (exc.headers.get("Location") or "").split("?", 1)[0]
            raise HablaError(f"Kubeflow Pipelines at {host} sends requests to a login page ({where}): "
                             f"{TOKEN_HINT}") from None  # fmt: skip
        if exc.code in (401, 403):
            if not token:
                raise HablaError(f"Kubeflow Pipelines at {host} needs authentication (HTTP {exc.code}): "
                                 f"{TOKEN_HINT}") from None  # fmt: skip
            return Server("unknown", True)  # a gateway that guards the health check too: the API calls will say
        if exc.code >= 500:
            raise Fault(f"Kubeflow Pipelines at {host} answers HTTP {exc.code} on {url}") from None
        raise HablaError(f"{host} does not look like a Kubeflow Pipelines API: HTTP {exc.code} on {url}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Fault(f"cannot reach Kubeflow Pipelines at {host}: {reason}") from None
    try:
        info = json.loads(body)
    except ValueError:
        raise HablaError(f"{host} does not look like a Kubeflow Pipelines API: {url} is not JSON "
                         f"(a login page? {TOKEN_HINT})") from None  # fmt: skip
    server = Server(str(info.get("tag_name") or "unknown"), info.get("multi_user") is True)
    check_version(server.tag, host)
    return server


def check_version(tag: str, host: str) -> None:
    """HablaError for a KFP release older than 2.16; an unknown one is logged and let through."""
    parts = tag.lstrip("v").split(".")
    try:
        version = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        log.warning("Kubeflow Pipelines at %s does not say its release (%r): habla needs 2.16 or newer", host, tag)
        return
    if version < OLDEST_SUPPORTED:
        raise HablaError(
            f"Kubeflow Pipelines at {host} is {tag}: habla's pipeline needs 2.16 or newer (a named ParallelFor "
            "feeding dsl.Collected fails at run time before 2.16: kubeflow/pipelines #12808, #13239)"
        )


class RequestedToken:
    """kfp's ``TokenCredentialsBase`` contract (``refresh_api_key_hook``) over :func:`habla.kubeflow.api.request_token`:
    a token of the pod's own account for the KFP audience, asked for again ten minutes before it expires."""

    def __init__(self, api_client: Any = None) -> None:
        self.api_client = api_client
        self.token, self.expires = "", 0.0

    def get(self) -> str:
        if time.time() > self.expires - 600:
            from habla.kubeflow.api import request_token

            self.token, self.expires = request_token(AUDIENCE, api_client=self.api_client)
        return self.token

    def refresh_api_key_hook(self, config: Any) -> None:
        config.api_key["authorization"] = self.get()


def credentials(source: tuple[str, str] | None, server: Server, api_client: Any = None) -> dict[str, Any]:
    """kfp.Client's keyword arguments that authenticate it: a token file re-read before each request
    (``credentials``), a token (``existing_token``), or, in a pod against a multi-user server without either, a
    requested token; {} for a standalone server without one."""
    if source is not None:
        kind, value = source
        if kind == "value":
            return {"existing_token": value}
        from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

        return {"credentials": ServiceAccountTokenVolumeCredentials(path=value)}
    from habla.kubeflow.api import own_service_account

    if server.multi_user and own_service_account() is not None:
        requested = RequestedToken(api_client)
        requested.get()  # fail now, in one line, rather than on the first call
        return {"credentials": requested}
    if server.multi_user:
        raise HablaError(f"Kubeflow Pipelines is multi-user: {TOKEN_HINT}")
    return {}


def namespace_for(namespace: str | None, server: Server) -> str | None:
    """The user namespace to work in: ``--namespace``, else (multi-user, in a pod) the pod's own; None for a
    standalone server. A multi-user server needs one: experiments, runs and private pipelines live in it."""
    if namespace or not server.multi_user:
        return namespace or None
    from habla.kubeflow.api import IN_CLUSTER_NAMESPACE

    try:
        return IN_CLUSTER_NAMESPACE.read_text(encoding="utf-8").strip() or None
    except OSError:
        raise HablaError(
            "Kubeflow Pipelines is multi-user: pass --namespace (your profile's namespace, e.g. "
            "kubeflow-user-example-com)"
        ) from None
