"""habla.kubeflow.lease against the Kubernetes API stand-in (tests/standins/k8s_api.py), whose Lease storage follows the
API server: optimistic concurrency on metadata.resourceVersion (409 Conflict on a stale one, 422 without one:
kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/registry/generic/registry/store.go ``Update`` and
pkg/registry/coordination/lease/strategy.go ``AllowUnconditionalUpdate() == false``), 409 AlreadyExists on a
second create (store.go ``Create``), MicroTime parsed as ``2006-01-02T15:04:05.000000Z07:00``
(apimachinery/pkg/apis/meta/v1/micro_time.go). The Lease fields are those of coordination.k8s.io/v1 LeaseSpec
(holderIdentity, leaseDurationSeconds, acquireTime, renewTime, leaseTransitions); taking over an expired Lease
increments leaseTransitions and releasing empties holderIdentity with leaseDurationSeconds 1, as client-go's
tools/leaderelection (tryAcquireOrRenew, release) does.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from fixtures.commands import cli_env
from standins.k8s_api import MICRO_TIME, StandinK8s

from habla.core.errors import Fault, HablaError
from habla.kubeflow import api as kube_api
from habla.kubeflow import lease
from habla.kubeflow.lease import LeaseClaims

NS = "team-asr"
NAME = "habla-0123456789-release-cv-corpus-25.0-2026-03-09-es"


def _request(api: StandinK8s, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(api.url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _lease_body(name: str = NAME, **spec) -> dict:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name}, "spec": spec}


def test_the_standin_enforces_resource_versions_the_way_the_api_server_does():
    path = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"
    with StandinK8s() as api:
        code, created = _request(api, "POST", path, _lease_body(holderIdentity="a", leaseDurationSeconds=10))
        assert code == 201 and created["metadata"]["resourceVersion"]
        code, again = _request(api, "POST", path, _lease_body(holderIdentity="b", leaseDurationSeconds=10))
        assert (code, again["reason"]) == (409, "AlreadyExists")
        stale = json.loads(json.dumps(created))
        code, updated = _request(api, "PUT", f"{path}/{NAME}", {**created, "spec": {"holderIdentity": "c"}})
        assert code == 200 and int(updated["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
        code, conflict = _request(api, "PUT", f"{path}/{NAME}", {**stale, "spec": {"holderIdentity": "d"}})
        assert (code, conflict["reason"]) == (409, "Conflict") and "the object has been modified" in conflict["message"]
        unconditional = {**updated, "metadata": {"name": NAME}}
        code, invalid = _request(api, "PUT", f"{path}/{NAME}", unconditional)
        assert (code, invalid["reason"]) == (422, "Invalid") and "must be specified for an update" in invalid["message"]
        code, bad_time = _request(
            api, "PUT", f"{path}/{NAME}", {**updated, "spec": {"renewTime": "2026-01-01T00:00:00Z"}}
        )
        assert code == 400, "MicroTime needs six fractional digits"
        code, _ = _request(api, "POST", path, _lease_body("other", leaseDurationSeconds=0))
        assert code == 422
        assert api.leases[(NS, NAME)]["spec"] == {"holderIdentity": "c"}


def test_acquire_renew_release_and_adopt():
    with StandinK8s() as api:
        claims = LeaseClaims(NS, api.api_client())
        held, why = claims.acquire(NAME, "watcher-a", 60, {"release": "cv-25"})
        assert why == "" and (held.holder, held.transitions, held.duration_s) == ("watcher-a", 0, 60)
        stored = api.leases[(NS, NAME)]
        assert stored["metadata"]["annotations"] == {"habla.dev/release": "cv-25"}
        assert MICRO_TIME.match(stored["spec"]["acquireTime"]) and MICRO_TIME.match(stored["spec"]["renewTime"])

        other, why = LeaseClaims(NS, api.api_client()).acquire(NAME, "watcher-b", 60, {})
        assert other is None and why.startswith("in progress by watcher-a until ")

        renewed = claims.renew(held, {})
        assert renewed.resource_version != held.resource_version and renewed.renewed >= held.renewed
        assert claims.renew(held, {}) is None, "a renewal from a stale read is refused (409): not ours any more"

        assert claims.release(renewed, {"status": "submitted"})
        spec = api.leases[(NS, NAME)]["spec"]
        assert "holderIdentity" not in spec and spec["leaseDurationSeconds"] == 1
        adopted, why = LeaseClaims(NS, api.api_client()).acquire(NAME, "watcher-b", 60, {})
        assert why == "" and adopted.holder == "watcher-b" and adopted.transitions == 1


def test_of_many_watchers_racing_for_one_lease_exactly_one_wins():
    with StandinK8s() as api:
        start = threading.Barrier(6)
        results: list = []

        def contender(i: int) -> None:
            claims = LeaseClaims(NS, api.api_client())
            start.wait()
            results.append(claims.acquire(NAME, f"watcher-{i}", 60, {}))

        threads = [threading.Thread(target=contender, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        winners = [held for held, _ in results if held is not None]
        assert len(results) == 6 and len(winners) == 1
        assert api.leases[(NS, NAME)]["spec"]["holderIdentity"] == winners[0].holder
        # Racing to adopt an expired lease: again one winner, one transition.
        api.leases[(NS, NAME)]["spec"]["renewTime"] = "2000-01-01T00:00:00.000000Z"
        results.clear()
        start.reset()
        threads = [threading.Thread(target=contender, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len([h for h, _ in results if h is not None]) == 1
        assert api.leases[(NS, NAME)]["spec"]["leaseTransitions"] == 1


HOLDER = """
import sys, time
from habla.kubeflow.lease import LeaseClaims
held, why = LeaseClaims(sys.argv[1]).acquire(sys.argv[2], "doomed-holder", float(sys.argv[3]), {})
print("held" if held else why, flush=True)
time.sleep(600)  # killed mid-claim, long before this ends
"""


def test_a_holder_killed_mid_claim_is_adopted_after_the_lease_expires_never_earlier(tmp_path):
    duration = 3
    with StandinK8s() as api:
        env = cli_env(KUBECONFIG=api.kubeconfig(tmp_path / "kubeconfig", NS))
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, NS, NAME, str(duration)], env=env, stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout.readline().strip() == "held"
        finally:
            holder.send_signal(signal.SIGKILL)  # no release, no cleanup: a pod evicted or OOM-killed
            holder.wait(timeout=10)
        spec = api.leases[(NS, NAME)]["spec"]
        expires = dt.datetime.fromisoformat(spec["renewTime"].replace("Z", "+00:00")) + dt.timedelta(seconds=duration)

        claims = LeaseClaims(NS, api.api_client())
        refusals = 0
        while True:
            held, why = claims.acquire(NAME, "successor", duration, {})
            now = lease.now()
            if held is not None:
                break
            assert "in progress by doomed-holder" in why
            refusals += 1
            assert now < expires + dt.timedelta(seconds=5), "never adopted"
            time.sleep(0.2)
        assert now >= expires, f"adopted {(expires - now).total_seconds():.3f} s before the lease expired"
        assert refusals >= 5, "the lease was tried while it was live"
        assert (held.holder, held.transitions) == ("successor", 1)


def test_api_errors_are_one_line_with_the_way_out():
    with StandinK8s(forbidden={"leases"}) as api:
        claims = LeaseClaims(NS, api.api_client())
        with pytest.raises(HablaError, match=r"^not allowed to get leases.coordination.k8s.io in namespace team-asr"):
            claims.acquire("x", "me", 10, {})
        api.forbidden.clear()
    with pytest.raises(Fault, match=r"^cannot reach the Kubernetes API to get Lease team-asr/x: ") as err:
        claims.acquire("x", "me", 10, {})  # the server is gone
    assert "\n" not in str(err.value) and "habla-watcher" not in str(err.value)


def test_lease_names_are_valid_and_distinct_per_state_store():
    a = lease.lease_name("s3://bucket/state", "releases", "cv-corpus-25.0-2026-03-09-es")
    b = lease.lease_name("s3://other/state", "releases", "cv-corpus-25.0-2026-03-09-es")
    assert a != b and a.endswith("-releases-cv-corpus-25.0-2026-03-09-es")
    assert len(lease.lease_name("s3://x", "releases", "y" * 400)) <= 253
    assert lease.micro_time(dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)) == "2026-01-01T00:00:00.000000Z"


def test_the_namespace_comes_from_the_kubeconfig_context(tmp_path, monkeypatch):
    with StandinK8s() as api:
        monkeypatch.setenv("KUBECONFIG", api.kubeconfig(tmp_path / "kubeconfig", "ml-team"))
        monkeypatch.setattr(kube_api, "IN_CLUSTER_NAMESPACE", tmp_path / "not-in-a-pod")
        assert kube_api.current_namespace() == "ml-team"
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    assert kube_api.current_namespace() == "default"


# ------------------------------------------------------------------ stores known to race: SeaweedFS before 4.18


def _seaweedfs_release(kfp: str) -> str:
    """The SeaweedFS release a standalone KFP ships (its vendored manifests: tests/kubeflow/upstream/kfp-*)."""
    import yaml
    from crd_schemas import UPSTREAM

    deployment = yaml.safe_load((UPSTREAM / f"kfp-{kfp}" / "seaweedfs-deployment.yaml").read_text())
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if "seaweedfs" in c["image"]]
    return container["image"].rsplit(":", 1)[1]


@pytest.mark.parametrize(("kfp", "racy"), [("2.16.0", True), ("2.17.0", False)])
def test_the_seaweedfs_each_kfp_ships_is_judged_by_its_release(kfp, racy):
    """SeaweedFS names itself in every S3 answer: ``Server: SeaweedFS <size limit> <major>.<minor>``
    (weed/s3api/stats.go; seen from 4.34 here: 'SeaweedFS 8000GB 4.34'). KFP 2.16 ships 4.00, before the fix of
    concurrent conditional PUTs (seaweedfs#8800, fixed in 4.18): claims there must be Leases."""
    from habla.core import conditional

    race = conditional.known_race(f"SeaweedFS 30GB {_seaweedfs_release(kfp)}")
    assert (race is not None) == racy
    if racy:
        assert "seaweedfs#8800" in race
    assert conditional.known_race("AmazonS3") is None and conditional.known_race("") is None


def test_a_racy_store_fails_the_check_and_auto_claims_through_leases(s3_bucket, monkeypatch, tmp_path):
    """A store that names itself SeaweedFS 4.00 is not probed (one at a time it would pass): --claims s3 refuses
    it in one line, --claims auto takes Leases, promotions (the same check) stop."""
    from habla.core import conditional

    monkeypatch.setattr(conditional, "_probes", {})
    monkeypatch.setattr(conditional, "_server_header", lambda bucket: "SeaweedFS 30GB 4.00")
    state = f"{s3_bucket}/state"
    probe = conditional.probe_conditional_writes(state)
    assert not probe.ok and "4.18" in probe.detail
    with pytest.raises(HablaError, match=r"does not enforce conditional writes: SeaweedFS 30GB 4.00.*--claims lease"):
        lease.choose_claims(state, "s3")
    with StandinK8s() as api:
        chosen = lease.choose_claims(state, "auto", "team-asr", api.api_client())
    assert chosen.mode == "lease"


def test_a_real_seaweedfs_names_its_release(seaweedfs_bucket):
    from habla.core import conditional, storage

    server = conditional._server_header(storage.split_s3(seaweedfs_bucket)[0])
    assert server.startswith("SeaweedFS ") and conditional.known_race(server) is None  # 4.34, the pinned wheel
