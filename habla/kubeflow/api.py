"""Talking to the Kubernetes and Kubeflow Pipelines APIs: a Kubernetes client (in a pod or from the kubeconfig),
the namespace to work in, and the one mapping of a failed API call to a one-line :class:`HablaError`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from habla.core.errors import Fault, HablaError, one_line

IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
IN_CLUSTER_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def kubernetes_client(api_client: Any = None) -> Any:
    """An ApiClient: the one given, else in-cluster config when in a pod, else the local kubeconfig."""
    if api_client is not None:
        return api_client
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
    except ImportError:
        raise HablaError("the kubernetes client is missing: pip install 'habla[pipeline]'") from None
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except ConfigException:
        try:
            config.load_kube_config(client_configuration=configuration)
        except (ConfigException, OSError) as exc:
            why = one_line(exc, first_line=True)
            raise HablaError(f"no Kubernetes access: not running in a pod and no usable kubeconfig ({why})") from None
    return client.ApiClient(configuration)


def current_namespace(default: str = "default", path: Path | str | None = None) -> str:
    """The pod's namespace in a cluster (``path``, default the service account's; a pipeline step launches its
    job beside itself), else the kubeconfig context's namespace, else ``default``."""
    try:
        return Path(path or IN_CLUSTER_NAMESPACE).read_text(encoding="utf-8").strip() or default
    except OSError:
        pass
    try:
        from kubernetes import config

        # KUBECONFIG as it is now (the client reads it once, when imported).
        _, active = config.list_kube_config_contexts(config_file=os.environ.get("KUBECONFIG") or None)
        return (active or {}).get("context", {}).get("namespace") or default
    except Exception:  # noqa: BLE001 - no kubeconfig: kubernetes_client() reports that when it matters
        return default


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of an API error (``ApiException``), None when there was no answer at all."""
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def api_error(
    exc: BaseException, action: str, *, api: str = "Kubernetes", rbac: str = "", forbidden: str = "", missing: str = ""
) -> HablaError | Fault:
    """A failed API call as one line that says what was being done and, where there is one, the way out.

    ``action`` is what the call did (``"get Lease team/x"``); ``rbac`` the permission it takes (``"get
    leases.coordination.k8s.io in namespace team"``), shown on 401/403 followed by ``forbidden`` (how to grant
    it); ``missing`` is the message for a 404 (an API that is not installed). The server's own message (its
    JSON ``Status``) is kept; the request, and so any credential, never is. No answer, throttling or a 5xx is a
    :class:`Fault` (exit 1: run again); any other answer a HablaError (exit 2: the input or setup is wrong).
    """
    status = status_of(exc)
    if status in (401, 403):
        return HablaError(f"not allowed to {rbac or action} (HTTP {status})" + (f": {forbidden}" if forbidden else ""))
    if status is None:
        return Fault(f"cannot reach the {api} API to {action}: {one_line(exc, with_type=True, first_line=True)}")
    if status == 404 and missing:
        return HablaError(f"{missing} ({one_line(exc)})")
    if status in (400, 422):
        return HablaError(f"the {api} API refused to {action}: {one_line(exc)}")
    if status == 429 or status >= 500:
        return Fault(f"{api} API error on {action}: {one_line(exc, first_line=True)}")
    return HablaError(f"{api} API error on {action}: {one_line(exc, first_line=True)}")


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: throttling, a 5xx, or no HTTP answer at all (connection refused or reset)."""
    status = status_of(exc)
    return status is None or status == 429 or status >= 500


def own_service_account(token_path: Path | str | None = None) -> tuple[str, str] | None:
    """(namespace, name) of the service account this pod runs as, read from its own token's ``sub`` claim
    (``system:serviceaccount:<namespace>:<name>``: what the API server authenticates it as); None outside a pod.
    The token is the pod's own, read only for its identity: nothing here trusts it."""
    import base64
    import json

    try:
        token = Path(token_path or IN_CLUSTER_TOKEN).read_text(encoding="ascii").strip()
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (OSError, IndexError, ValueError, UnicodeError):
        return None
    prefix, _, rest = str(claims.get("sub", "")).partition("system:serviceaccount:")
    namespace, _, name = rest.partition(":")
    return (namespace, name) if not prefix and namespace and name else None


def request_token(audience: str, seconds: int = 3600, api_client: Any = None) -> tuple[str, float]:
    """A token of this pod's own service account for ``audience`` (the TokenRequest API, what a projected
    ``serviceAccountToken`` volume gets from the kubelet), and when it expires (``time.time()``). Needs
    ``create serviceaccounts/token`` on that account. One-line HablaError/Fault when it cannot be had."""
    import time

    account = own_service_account()
    if account is None:
        raise HablaError(f"cannot request a token for {audience}: not running in a pod with a service account token")
    namespace, name = account
    from kubernetes import client

    body = client.AuthenticationV1TokenRequest(
        api_version="authentication.k8s.io/v1",
        kind="TokenRequest",
        spec=client.V1TokenRequestSpec(audiences=[audience], expiration_seconds=seconds),
    )
    try:
        answer = client.CoreV1Api(kubernetes_client(api_client)).create_namespaced_service_account_token(
            name, namespace, body, _request_timeout=60
        )
    except Exception as exc:  # noqa: BLE001 - the client's errors, mapped to one line
        raise api_error(
            exc,
            f"request a token of {namespace}/{name} for {audience}",
            rbac=f"create serviceaccounts/token {name} in namespace {namespace}",
            forbidden="apply manifests/ (the Role habla-kfp-token) or mount a projected token for that audience",
        ) from None
    expires = answer.status.expiration_timestamp
    return answer.status.token, expires.timestamp() if expires else time.time() + seconds
