"""Claims held through a Kubernetes ``coordination.k8s.io/v1`` Lease: exactly-once without trusting an object store.

The API server serializes writes to one object and rejects a write made from a stale read (optimistic
concurrency on ``metadata.resourceVersion``: 409 Conflict; a second create of the same name: 409 AlreadyExists).
A claim is therefore:

- **create** the Lease with ``holderIdentity`` = this watcher, ``leaseDurationSeconds``, ``acquireTime`` and
  ``renewTime`` = now, ``leaseTransitions`` = 0 — or, when it exists,
- **adopt** it if it is released (no ``holderIdentity``) or expired (``renewTime + leaseDurationSeconds`` in the
  past): replace it, naming the ``resourceVersion`` that was read, with this holder, ``leaseTransitions`` + 1;
- **renew** it (``renewTime`` = now, same ``resourceVersion`` precondition) before acting on it: a 409 means
  another watcher adopted it after it expired, and this one must not act;
- **release** it when done, as client-go's leader election does (``holderIdentity`` emptied,
  ``leaseDurationSeconds`` 1), so the next attempt need not wait for the lease to run out.

Of two watchers racing for one Lease exactly one write succeeds. Unlike client-go, which measures expiry from
the moment it observed a record change (it runs for a long time), a watcher is one short process: it compares
``renewTime`` (the holder's clock) with its own clock, so the nodes' clocks must agree to well within the lease
(the watcher's default is 15 minutes).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from habla.core import conditional
from habla.core.claims import Attempt, AttemptClaims, Claims
from habla.core.errors import Fault, HablaError
from habla.kubeflow.api import api_error, current_namespace, kubernetes_client

log = logging.getLogger(__name__)

GROUP = "coordination.k8s.io"
# What LeaseClaims asks of the API server: manifests/ must grant all of it (tests check the Role).
REQUIRED_PERMISSIONS: tuple[tuple[str, str, str], ...] = tuple(
    (GROUP, "leases", verb) for verb in ("get", "create", "update")
)
LABEL = "app.kubernetes.io/part-of"
ANNOTATION_PREFIX = "habla.dev/"
TIMEOUT = 30  # seconds per request
_NOT_DNS = re.compile(r"[^a-z0-9.-]+")


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def micro_time(t: dt.datetime) -> str:
    """A ``MicroTime`` as the API server parses it: RFC 3339 with exactly six fractional digits."""
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_name(*parts: str) -> str:
    """A valid Lease name (DNS subdomain, at most 253 characters) for ``parts``, with a hash that keeps it unique."""
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:10]
    readable = _NOT_DNS.sub("-", "-".join(parts[1:] or parts).lower()).strip("-.")
    return f"habla-{digest}-{readable}"[:253].rstrip("-.")


@dataclass(frozen=True)
class Held:
    """A Lease this process holds, as the API server last returned it."""

    name: str
    namespace: str
    holder: str
    resource_version: str
    uid: str
    transitions: int
    duration_s: int
    acquired: dt.datetime
    renewed: dt.datetime
    previous: dict = field(default_factory=dict)  # the annotations (habla.dev/ stripped) the Lease had before

    @property
    def expires(self) -> dt.datetime:
        return self.renewed + dt.timedelta(seconds=self.duration_s)


def _parse_time(value: Any) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


class LeaseClaims:
    """Create, adopt, renew and release Leases in one namespace through the official ``kubernetes`` client."""

    def __init__(self, namespace: str | None = None, api_client: Any = None) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        self.namespace = namespace or current_namespace()
        self.api = client.CoordinationV1Api(kubernetes_client(api_client))
        self.ApiException = ApiException

    # ------------------------------------------------------------------------------------------ calls

    def _error(self, exc: Exception, verb: str, name: str) -> HablaError | Fault:
        return api_error(
            exc,
            f"{verb} Lease {self.namespace}/{name}",
            rbac=f"{verb} leases.{GROUP} in namespace {self.namespace}",
            forbidden="apply manifests/ and run the watcher under a service account bound to the Role habla-watcher",
        )

    def _call(self, verb: str, name: str, fn, *args, **kwargs) -> Any:
        """The API call, or None on 409 (AlreadyExists / Conflict: another writer got there first)."""
        import urllib3

        try:
            return fn(*args, _request_timeout=TIMEOUT, **kwargs)
        except self.ApiException as exc:
            if exc.status == 409:
                return None
            if exc.status == 404 and verb == "get":
                return None
            raise self._error(exc, verb, name) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(exc, verb, name) from None

    def _held(self, lease: Any, previous: dict | None = None) -> Held:
        spec, meta = lease.spec, lease.metadata
        return Held(
            previous=previous or {},
            name=meta.name,
            namespace=meta.namespace or self.namespace,
            holder=spec.holder_identity or "",
            resource_version=meta.resource_version,
            uid=meta.uid or "",
            transitions=spec.lease_transitions or 0,
            duration_s=spec.lease_duration_seconds or 0,
            acquired=_parse_time(spec.acquire_time) or now(),
            renewed=_parse_time(spec.renew_time) or now(),
        )

    def _body(self, name: str, spec: dict, annotations: dict, resource_version: str = "", uid: str = "") -> dict:
        metadata: dict[str, Any] = {
            "name": name,
            "namespace": self.namespace,
            "labels": {LABEL: "habla"},
            "annotations": {ANNOTATION_PREFIX + k: str(v) for k, v in annotations.items()},
        }
        if resource_version:  # the precondition: the API server refuses the write if the Lease changed since
            metadata["resourceVersion"] = resource_version
            metadata["uid"] = uid
        return {"apiVersion": f"{GROUP}/v1", "kind": "Lease", "metadata": metadata, "spec": spec}

    # ------------------------------------------------------------------------------------- the claim

    def acquire(self, name: str, holder: str, duration_s: float, annotations: dict) -> tuple[Held | None, str]:
        """Create the Lease, or adopt it when it is released or expired. ``(held, "")`` or ``(None, why not)``."""
        duration = max(1, int(round(duration_s)))
        t = now()
        spec = {
            "holderIdentity": holder,
            "leaseDurationSeconds": duration,
            "acquireTime": micro_time(t),
            "renewTime": micro_time(t),
            "leaseTransitions": 0,
        }
        current = self._call("get", name, self.api.read_namespaced_lease, name, self.namespace)
        if current is None:
            created = self._call(
                "create", name, self.api.create_namespaced_lease, self.namespace, self._body(name, spec, annotations)
            )
            if created is None:
                return None, "claimed by another watcher at the same moment"
            return self._held(created), ""
        seen = self._held(current)
        if seen.holder and seen.expires > t:
            return None, f"in progress by {seen.holder} until {micro_time(seen.expires)} (Lease {name})"
        spec["leaseTransitions"] = seen.transitions + 1
        replaced = self._call(
            "update",
            name,
            self.api.replace_namespaced_lease,
            name,
            self.namespace,
            self._body(name, spec, annotations, seen.resource_version, seen.uid),
        )
        if replaced is None:
            return None, "claimed by another watcher at the same moment"
        before = current.metadata.annotations or {}
        previous = {k[len(ANNOTATION_PREFIX) :]: v for k, v in before.items() if k.startswith(ANNOTATION_PREFIX)}
        return self._held(replaced, previous), ""

    def renew(self, held: Held, annotations: dict) -> Held | None:
        """Renew a held Lease; None if it is no longer ours (another watcher adopted it after it expired)."""
        spec = {
            "holderIdentity": held.holder,
            "leaseDurationSeconds": held.duration_s,
            "acquireTime": micro_time(held.acquired),
            "renewTime": micro_time(now()),
            "leaseTransitions": held.transitions,
        }
        body = self._body(held.name, spec, annotations, held.resource_version, held.uid)
        renewed = self._call("update", held.name, self.api.replace_namespaced_lease, held.name, self.namespace, body)
        return None if renewed is None else self._held(renewed)

    def release(self, held: Held, annotations: dict) -> bool:
        """Give the Lease up (as client-go does: no holder, duration 1 s). False if it was no longer ours."""
        t = now()
        spec = {
            "leaseDurationSeconds": 1,
            "acquireTime": micro_time(t),
            "renewTime": micro_time(t),
            "leaseTransitions": held.transitions,
        }
        body = self._body(held.name, spec, annotations, held.resource_version, held.uid)
        released = self._call("update", held.name, self.api.replace_namespaced_lease, held.name, self.namespace, body)
        return released is not None


class LeaseAttempts:
    """habla.core.claims.Claims over Kubernetes Leases: one Lease per release (or download) and state store, for
    stores that do not enforce conditional writes."""

    mode = "lease"

    def __init__(self, state: str, namespace: str | None, api_client: Any) -> None:
        self.state = state
        self.leases = LeaseClaims(namespace, api_client)

    def take(self, folder: str, owner: str, lease: float) -> tuple[Attempt | None, str]:
        kind, name = folder.rstrip("/").split("/")[-2:]  # STATE/releases/<name>, STATE/downloads/<name>
        annotations = {"state": self.state, "release": name, "status": "submitting"}
        held, why = self.leases.acquire(lease_name(self.state, kind, name), owner, lease, annotations)
        if held is None:
            return None, why
        return Attempt(held.transitions + 1, held.expires, held=held, annotations=annotations), ""

    def still_ours(self, attempt: Attempt) -> bool:
        renewed = self.leases.renew(attempt.held, attempt.annotations)
        if renewed is None:
            return False
        attempt.held, attempt.expires = renewed, renewed.expires
        return True

    def finish(self, attempt: Attempt, status: str, **fields: Any) -> None:
        self.leases.release(attempt.held, {**attempt.annotations, "status": status, **fields})

    def fail(self, attempt: Attempt, error: str) -> None:
        self.leases.release(attempt.held, {**attempt.annotations, "status": "failed", "error": error[:1000]})

    def drop(self, attempt: Attempt) -> None:
        """Give back an attempt that found the work done: the Lease keeps the outcome its last holder wrote."""
        self.leases.release(attempt.held, attempt.held.previous or attempt.annotations)


CLAIM_MODES = ("s3", "lease", "auto")


def choose_claims(state: str, mode: str, lease_namespace: str | None = None, kube_client: Any = None) -> Claims:
    """The claims for ``--claims`` ``s3`` (the state store's conditional writes, refused unless the probe
    passes), ``lease`` (a Kubernetes Lease) or ``auto`` (s3 when the probe passes, else the Lease)."""
    if mode not in CLAIM_MODES:
        raise HablaError(f"--claims {mode!r}: expected one of {', '.join(CLAIM_MODES)}")
    if mode == "lease":
        return LeaseAttempts(state, lease_namespace, kube_client)
    probe = conditional.probe_conditional_writes(state)
    if probe.ok:
        log.info("claims: conditional writes on %s (%s)", probe.store, probe.detail)
        return AttemptClaims()
    refusal = (
        f"the state store {probe.store} does not enforce conditional writes: {probe.detail}; two watchers could "
        "both submit a release"
    )
    if mode == "s3":
        raise HablaError(
            f"{refusal}: use --claims lease (a Kubernetes Lease, in a cluster) or a store that enforces them "
            "(docs/operations.md, 'Object stores')"
        )
    try:
        claims = LeaseAttempts(state, lease_namespace, kube_client)
    except HablaError as exc:
        raise HablaError(f"{refusal}, and --claims auto found no Kubernetes API for a Lease: {exc}") from None
    log.warning("%s; claiming through Kubernetes Leases in namespace %s instead", refusal, claims.leases.namespace)
    return claims
