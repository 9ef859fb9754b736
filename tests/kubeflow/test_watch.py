"""habla watch: version ordering, exactly-once submission (two watchers racing on S3), crash safety, MDC, and
claims on stores that ignore conditional writes (the probe refuses them; --claims auto falls back to Leases)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.commands import cli_env, in_threads
from standins.k8s_api import StandinK8s
from standins.kfp_server import KfpStandin, compile_fake_training_pipeline
from standins.mdc_api import KEY, MdcStandin, Misbehaviour, leaks

from habla import cli
from habla.core import conditional, storage
from habla.core.errors import HablaError
from habla.data import inbox as data_inbox
from habla.data import mdc
from habla.kubeflow import kfp_api, watch
from habla.speech.releases import parse_release_name

ES = "es"


def _names(*versions: str) -> list[str]:
    return [f"cv-corpus-{v}-es" for v in versions]


def _archive(inbox: str, name: str) -> str:
    uri = storage.join(inbox, f"{name}.tar.gz")
    storage.write_bytes(uri, b"not a real archive: the fake training pipeline never opens it")
    storage.write_text(uri + ".sha256", "0" * 64)  # uploaded whole: the sidecar comes last
    return uri


def _folder(inbox: str, top: str, locale: str = ES) -> str:
    storage.write_text(storage.join(inbox, top, locale, "validated.tsv"), "client_id\tpath\tsentence\n")
    return storage.join(inbox, top)


def _runs_by_release(server: KfpStandin) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run in server.runs.values():
        counts[run["display_name"]] = counts.get(run["display_name"], 0) + 1
    return counts


@pytest.fixture
def kfp(monkeypatch, tmp_path):
    """A stand-in KFP server, and the training pipeline replaced by a small one with the same interface."""
    package_dir = tmp_path / "package"
    package_dir.mkdir()
    package = compile_fake_training_pipeline(str(package_dir))
    with KfpStandin() as server:
        server.package = package
        yield server


# ----------------------------------------------------------------------------------- ordering, finding


def test_versions_order_numerically_not_as_text():
    names = [
        "cv-corpus-25.0-2026-03-09-es",
        "cv-corpus-9.0-2022-04-27-es",
        "cv-corpus-17.0-2024-03-15-es",
        "cv-corpus-5.1-2020-06-22-es",
        "cv-corpus-10.0-delta-2022-07-04-es",
    ]
    ordered = sorted(parse_release_name(n) for n in names)
    assert [r.version_str for r in ordered] == ["5.1", "9.0", "10.0", "17.0", "25.0"]
    assert parse_release_name("cv-corpus-9.0-2022-04-27-es") < parse_release_name("cv-corpus-17.0-2024-03-15-es")
    assert ordered[2].delta


def test_find_releases_reads_archives_and_extracted_folders(tmp_path):
    inbox = str(tmp_path / "inbox")
    _archive(inbox, "cv-corpus-17.0-2024-03-15-es")
    _archive(inbox, "cv-corpus-25.0-2026-03-09-es")
    folder = _folder(inbox, "cv-corpus-25.0-2026-03-09")  # the same release extracted: preferred
    _folder(inbox, "cv-corpus-9.0-2022-04-27-es")  # a folder named with its locale
    _archive(inbox, "cv-corpus-25.0-2026-03-09-fr")  # another locale
    _archive(inbox, "cv-corpus-10.0-delta-2022-07-04-es")
    storage.write_text(storage.join(inbox, "cv-corpus-20.0-2024-12-06", "es", "clips", "x.mp3"), "")  # no TSV yet
    storage.write_text(storage.join(inbox, ".cv-corpus-21.0-2025-03-14-es.tar.gz.part"), "")  # being copied
    storage.write_text(storage.join(inbox, "notes.txt"), "")
    found = data_inbox.find_releases(inbox, ES)
    assert [r.name.name for r in found] == [
        "cv-corpus-9.0-2022-04-27-es",
        "cv-corpus-10.0-delta-2022-07-04-es",
        "cv-corpus-17.0-2024-03-15-es",
        "cv-corpus-25.0-2026-03-09-es",
    ]
    assert found[-1].uri == folder


# ------------------------------------------------------------------------------------ the decisions


def test_watch_submits_each_new_release_once_in_version_order(kfp, tmp_path):
    inbox, state, out = str(tmp_path / "inbox"), str(tmp_path / "state"), str(tmp_path / "out")
    # Uploaded newest first: the order of arrival must not matter.
    _archive(inbox, "cv-corpus-25.0-2026-03-09-es")
    time.sleep(0.01)
    _archive(inbox, "cv-corpus-17.0-2024-03-15-es")
    options = {
        "output_root": out,
        "host": kfp.url,
        "package": kfp.package,
        "experiment": "cv-es",
        "params": {"nodes": 2},
    }

    first = watch.watch(inbox, state, **options)
    assert [(d.release, d.action) for d in first] == [
        ("cv-corpus-17.0-2024-03-15-es", "submitted"),
        ("cv-corpus-25.0-2026-03-09-es", "submitted"),
    ]
    runs = sorted(kfp.runs.values(), key=lambda r: r["display_name"])
    assert [r["display_name"] for r in runs] == [
        "habla-cv-corpus-17.0-2024-03-15-es",
        "habla-cv-corpus-25.0-2026-03-09-es",
    ]
    params = runs[1]["runtime_config"]["parameters"]
    assert params == {
        "release_uri": storage.join(inbox, "cv-corpus-25.0-2026-03-09-es.tar.gz"),
        "output_uri": out,
        "run_name": "habla-cv-corpus-25.0-2026-03-09-es",
        "locale": "es",
        "nodes": 2,
        "config": "small",
        "max_steps": 1000,
    }  # defaults passed explicitly too

    # Nothing new: nothing submitted. A late, older release and a delta release show up.
    _archive(inbox, "cv-corpus-20.0-2024-12-06-es")
    _archive(inbox, "cv-corpus-26.0-delta-2026-06-10-es")
    second = {d.release: d for d in watch.watch(inbox, state, **options)}
    assert second["cv-corpus-25.0-2026-03-09-es"].action == "known"
    assert second["cv-corpus-20.0-2024-12-06-es"].action == "older"
    assert second["cv-corpus-26.0-delta-2026-06-10-es"].action == "refused"
    assert "delta releases are not supported yet" in second["cv-corpus-26.0-delta-2026-06-10-es"].detail
    # The refusal is recorded: reported once, not on every run.
    third = {d.release: d for d in watch.watch(inbox, state, **options)}
    assert third["cv-corpus-26.0-delta-2026-06-10-es"].action == "known"

    _folder(inbox, "cv-corpus-27.0-2026-09-15")
    fourth = {d.release: d.action for d in watch.watch(inbox, state, **options)}
    assert fourth["cv-corpus-27.0-2026-09-15-es"] == "submitted"
    assert set(_runs_by_release(kfp).values()) == {1} and len(kfp.runs) == 3

    summary = json.loads(storage.read_text(storage.join(state, "summary.json")))
    assert summary["last_processed"] == {"es": "cv-corpus-27.0-2026-09-15-es"}
    assert {r["release"]: r["status"] for r in summary["releases"]} == {
        "cv-corpus-17.0-2024-03-15-es": "submitted",
        "cv-corpus-25.0-2026-03-09-es": "submitted",
        "cv-corpus-26.0-delta-2026-06-10-es": "refused",
        "cv-corpus-27.0-2026-09-15-es": "submitted",
    }


def test_dry_run_writes_and_submits_nothing(tmp_path):
    inbox, state = str(tmp_path / "inbox"), str(tmp_path / "state")
    _archive(inbox, "cv-corpus-25.0-2026-03-09-es")
    _archive(inbox, "cv-corpus-26.0-delta-2026-06-10-es")
    decisions = watch.watch(inbox, state, dry_run=True)  # no KFP needed
    assert [d.action for d in decisions] == ["would-submit", "would-refuse"]
    assert not Path(state).exists()


def test_a_failed_submission_is_retried_and_a_crashed_one_adopted(kfp, tmp_path, monkeypatch):
    inbox, state, out = str(tmp_path / "inbox"), str(tmp_path / "state"), str(tmp_path / "out")
    _archive(inbox, "cv-corpus-25.0-2026-03-09-es")
    name = "cv-corpus-25.0-2026-03-09-es"
    claims = Path(state, "releases", name)

    # 1. The API refuses the run: the claim is marked failed, nothing is recorded as submitted.
    real_submit = kfp_api.submit_run
    monkeypatch.setattr(kfp_api, "submit_run", lambda *a, **k: (_ for _ in ()).throw(HablaError("HTTP 503")))
    [failed] = watch.watch(inbox, state, output_root=out, host=kfp.url, package=kfp.package)
    assert (failed.action, failed.detail) == ("failed", "HTTP 503")
    assert json.loads((claims / "claim-0001.json").read_text())["status"] == "failed"
    assert not (claims / "result.json").exists()

    # 2. The next run retries with a new attempt and succeeds.
    monkeypatch.setattr(kfp_api, "submit_run", real_submit)
    [done] = watch.watch(inbox, state, output_root=out, host=kfp.url, package=kfp.package)
    assert done.action == "submitted"
    assert json.loads((claims / "result.json").read_text())["attempt"] == 2

    # 3. A watcher that died after creating the run but before recording it: its claim is still
    #    "submitting". While the lease runs, others keep off; after it, the run is found and adopted.
    (claims / "result.json").unlink()
    crashed = {
        "attempt": 3,
        "owner": "pod-x",
        "status": "submitting",
        "started_at": "2026-01-01T00:00:00+00:00",
        "expires_at": "2999-01-01T00:00:00+00:00",
    }
    (claims / "claim-0003.json").write_text(json.dumps(crashed))
    [busy] = watch.watch(inbox, state, output_root=out, host=kfp.url, package=kfp.package)
    assert busy.action == "in-progress" and "pod-x" in busy.detail
    crashed["expires_at"] = "2000-01-01T00:00:00+00:00"
    (claims / "claim-0003.json").write_text(json.dumps(crashed))
    [adopted] = watch.watch(inbox, state, output_root=out, host=kfp.url, package=kfp.package)
    assert adopted.action == "adopted" and adopted.run_id == done.run_id
    assert len(kfp.runs) == 1


def test_unreachable_kfp_fails_in_one_line_and_leaves_no_claim(tmp_path, capsys):
    inbox, state = str(tmp_path / "inbox"), str(tmp_path / "state")
    _archive(inbox, "cv-corpus-25.0-2026-03-09-es")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    code = cli.main(
        [
            "watch",
            "--inbox",
            inbox,
            "--state",
            state,
            "--output-root",
            str(tmp_path / "o"),
            "--host",
            f"http://127.0.0.1:{port}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "cannot reach Kubeflow Pipelines" in err  # a fault
    assert not Path(state, "releases").exists()
    assert cli.main(["watch", "--inbox", str(tmp_path / "missing"), "--state", state, "--dry-run"]) == 2


# -------------------------------------------------------------------------- two watchers, one S3 store


def _watchers_together(count: int, poll) -> list:
    """``poll`` in ``count`` threads released at once; every decision they made (none may raise)."""
    return [d for decisions in in_threads({f"watcher-{k}": poll for k in range(count)}).values() for d in decisions]


def test_concurrent_watcher_threads_submit_each_release_exactly_once(s3_bucket, kfp, tmp_path):
    inbox, state, out = f"{s3_bucket}/inbox", f"{s3_bucket}/state", f"{s3_bucket}/runs"
    for version in ("17.0-2024-03-15", "20.0-2024-12-06", "25.0-2026-03-09"):
        _archive(inbox, f"cv-corpus-{version}-es")
    kfp.run_delay = 0.3  # a slow API widens the window in which the watchers overlap
    for watcher_round in range(2):  # the second round finds everything processed
        decisions = _watchers_together(
            4, lambda: watch.watch(inbox, state, output_root=out, host=kfp.url, package=kfp.package)
        )
        actions = [d.action for d in decisions]
        assert actions.count("submitted") == (3 if watcher_round == 0 else 0), actions
        assert "failed" not in actions
    assert _runs_by_release(kfp) == {
        f"habla-cv-corpus-{v}-es": 1 for v in ("17.0-2024-03-15", "20.0-2024-12-06", "25.0-2026-03-09")
    }
    results = watch.read_results(state)
    assert sorted(r["run_id"] for r in results.values()) == sorted(kfp.runs)


# ------------------------------------------------------------------------------ Mozilla Data Collective


def test_mdc_requests_carry_the_key_only_where_needed(monkeypatch):
    monkeypatch.delenv(mdc.API_URL_ENV, raising=False)
    monkeypatch.delenv(mdc.API_KEY_ENV, raising=False)
    catalog = mdc.catalog_request("es")
    assert catalog.method == "GET"
    assert catalog.url.startswith("https://mozilladatacollective.com/api/datasets?")
    assert "locale=es" in catalog.url and "sort=newest" in catalog.url and "task=ASR" in catalog.url
    assert "Authorization" not in catalog.headers
    with pytest.raises(HablaError, match="MDC_API_KEY"):
        mdc.download_request("abc123")
    monkeypatch.setenv(mdc.API_KEY_ENV, "sekret-key")
    session = mdc.download_request("abc123")
    assert (session.method, session.url) == ("POST", "https://mozilladatacollective.com/api/datasets/abc123/download")
    assert session.headers["Authorization"] == "Bearer sekret-key"
    assert "sekret" not in mdc.describe(session)


def test_mdc_catalog_entries_become_release_names():
    catalog = {
        "total": 4,
        "items": [
            {
                "id": "a1",
                "name": "Common Voice Scripted Speech 25.0 - Spanish",
                "locale": "es",
                "longDescription": "This datasheet is for cv-corpus-25.0-2026-03-09 of the Mozilla Common Voice ...",
            },
            {
                "id": "a2",
                "name": "Common Voice Scripted Speech 24.0 - Spanish",
                "locale": "es",
                "filename": "cv-corpus-24.0-2025-12-05-es.tar.gz",
            },
            {"id": "a3", "name": "Common Voice Spontaneous Speech 2.0 - Spanish", "locale": "es"},
            {"id": "a4", "name": "Common Voice Scripted Speech 25.0 - Interlingua", "locale": "ia"},
        ],
    }
    found = mdc.releases_in(catalog, "es")
    assert [(r.name.name, r.dataset_id) for r in found] == [
        ("cv-corpus-24.0-2025-12-05-es", "a2"),
        ("cv-corpus-25.0-2026-03-09-es", "a1"),
    ]


@pytest.fixture
def data_collective(monkeypatch):
    """The Data Collective's stand-in (tests/standins/mdc_api.py) offering release 25.0, with the backoff's waits
    recorded instead of slept."""
    with MdcStandin(b"\x1f\x8b fake archive bytes" * 1000) as server:
        monkeypatch.setenv(mdc.API_URL_ENV, f"{server.url}/api")
        monkeypatch.setenv(mdc.API_KEY_ENV, KEY)
        monkeypatch.setattr(mdc, "BACKOFF", mdc.Backoff(sleep=lambda seconds: None))
        yield server


def test_watch_downloads_a_new_release_from_mdc_then_submits_it(kfp, data_collective, tmp_path, caplog, capsys):
    inbox, state = str(tmp_path / "inbox"), str(tmp_path / "state")
    _archive(inbox, "cv-corpus-17.0-2024-03-15-es")
    caplog.set_level("DEBUG")
    code = cli.main(["-v", "watch", "--inbox", inbox, "--state", state, "--output-root", str(tmp_path / "o"),
                     "--host", kfp.url, "--mdc"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0
    target = Path(inbox, "cv-corpus-25.0-2026-03-09-es.tar.gz")
    assert target.read_bytes() == data_collective.archive
    assert "downloaded" in out.out and "submitted" in out.out
    assert _runs_by_release(kfp) == {"habla-cv-corpus-17.0-2024-03-15-es": 1, "habla-cv-corpus-25.0-2026-03-09-es": 1}
    # The key went only to the download-session request, and never to logs, output or state.
    assert [(m, "Authorization" in h) for m, _, h in data_collective.requests] == [
        ("GET", False),
        ("POST", True),
        ("GET", False),
    ]
    assert not leaks(caplog.text, out.out, out.err, folder=tmp_path)
    assert not any(p.name.endswith(".part") for p in Path(inbox).rglob("*"))
    assert os.listdir(Path(inbox, ".incoming")) == []


HOSTILE = {
    "catalog-500-every-time": [Misbehaviour(status=500)] * 4,
    "catalog-not-json": [Misbehaviour(body="not-json")],
    "catalog-items-not-list": [Misbehaviour(body="items-not-list")],
    "session-without-url": [None, Misbehaviour(body="no-url")],
    "redirect-loop": [None, Misbehaviour(redirects=-1)],
    "archive-hangs-up-every-time": [None, None, Misbehaviour(hangup=True)] + [None, Misbehaviour(stop_at=100)] * 3,
    "archive-corrupt": [None, None, Misbehaviour(body="corrupt")],
    "key-refused": [None, Misbehaviour(status=401)],
}


@pytest.mark.parametrize("script", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_data_collective_is_one_failed_decision_and_the_next_poll_tries_again(
    kfp, data_collective, tmp_path, capsys, caplog, script
):
    inbox, state = str(tmp_path / "inbox"), str(tmp_path / "state")
    _archive(inbox, "cv-corpus-17.0-2024-03-15-es")
    data_collective.misbehave = list(script)
    caplog.set_level("DEBUG")
    argv = ["watch", "--inbox", inbox, "--state", state, "--output-root", str(tmp_path / "o"), "--host", kfp.url,
            "--package", kfp.package, "--mdc", "--json"]  # fmt: skip
    assert cli.main(argv) == 1  # a failed decision
    out = capsys.readouterr()
    decisions = json.loads(out.out)
    assert [(d["release"], d["action"]) for d in decisions] == [
        ("mdc:es", "failed"),
        ("cv-corpus-17.0-2024-03-15-es", "submitted"),
    ]
    assert decisions[0]["detail"] and "\n" not in decisions[0]["detail"] and "Traceback" not in decisions[0]["detail"]
    assert not Path(inbox, "cv-corpus-25.0-2026-03-09-es.tar.gz").exists()
    assert not leaks(out.out, out.err, caplog.text, folder=tmp_path)

    data_collective.reset()  # the next poll, the Data Collective well again
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert [(d["release"], d["action"]) for d in json.loads(out.out)] == [
        ("cv-corpus-25.0-2026-03-09-es", "downloaded"),
        ("cv-corpus-17.0-2024-03-15-es", "known"),
        ("cv-corpus-25.0-2026-03-09-es", "submitted"),
    ]
    assert Path(inbox, "cv-corpus-25.0-2026-03-09-es.tar.gz").read_bytes() == data_collective.archive
    assert not leaks(out.out, out.err, caplog.text, folder=tmp_path)
    claims = [json.loads(p.read_text()) for p in sorted(Path(state, "downloads").rglob("claim-*.json"))]
    assert claims[-1]["status"] == "downloaded"  # a claim the failed poll took was marked failed, with one line
    assert all(c["status"] == "failed" and "\n" not in c["error"] for c in claims[:-1])


def test_two_watcher_processes_racing_on_s3_submit_each_release_once(s3_bucket, kfp, tmp_path):
    inbox, state = f"{s3_bucket}/inbox", f"{s3_bucket}/state"
    versions = ("24.0-2025-12-05", "25.0-2026-03-09")
    for version in versions:
        _archive(inbox, f"cv-corpus-{version}-es")
    kfp.run_delay = 0.3
    package = compile_fake_training_pipeline(str(tmp_path))
    command = _watch_command(inbox, state, f"{s3_bucket}/runs", kfp, package)
    actions, _ = _watcher_processes(command, dict(os.environ), 2)
    assert actions.count("submitted") == 2 and "failed" not in actions
    assert _runs_by_release(kfp) == {f"habla-cv-corpus-{v}-es": 1 for v in versions}


def test_an_unreachable_data_collective_does_not_hold_up_the_inbox(kfp, tmp_path, monkeypatch):
    monkeypatch.setattr(mdc, "BACKOFF", mdc.Backoff(sleep=lambda seconds: None))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv(mdc.API_URL_ENV, f"http://127.0.0.1:{s.getsockname()[1]}/api")
    inbox = str(tmp_path / "inbox")
    _archive(inbox, "cv-corpus-25.0-2026-03-09-es")
    decisions = watch.watch(
        inbox, str(tmp_path / "state"), output_root=str(tmp_path / "o"), host=kfp.url, package=kfp.package, mdc=True
    )
    assert [(d.release, d.action) for d in decisions] == [
        ("mdc:es", "failed"),
        ("cv-corpus-25.0-2026-03-09-es", "submitted"),
    ]
    assert "ConnectionError on GET" in decisions[0].detail and "4 attempts" in decisions[0].detail


# ------------------------------------------------------------- stores that ignore conditional writes


def _watch_command(inbox: str, state: str, out: str, kfp: KfpStandin, package: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "habla.cli", "watch", "--inbox", inbox, "--state", state, "--output-root", out,
            "--host", kfp.url, "--package", package, "--json", *extra]  # fmt: skip


def _watcher_processes(command: list[str], env: dict, count: int) -> tuple[list[str], list[str]]:
    """``count`` watcher processes started together; each must exit 0. Their decisions' actions, and stderrs."""
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(count)]  # fmt: skip
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * count, [err for _, err in outputs]
    return [d["action"] for out, _ in outputs for d in json.loads(out)], [err for _, err in outputs]


def test_claims_s3_refuses_a_store_that_ignores_conditional_writes(lax_s3, kfp, tmp_path):
    bucket, proxy = lax_s3
    inbox, state = f"{bucket}/inbox", f"{bucket}/state"
    _archive(inbox, "cv-corpus-25.0-2026-03-09-es")
    with pytest.raises(HablaError) as err:
        watch.watch(inbox, state, output_root=f"{bucket}/runs", host=kfp.url, package=kfp.package, claims="s3")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"the state store {bucket} at http://127.0.0.1:")
    assert "does not enforce conditional writes: two concurrent PUTs with If-None-Match: * both answered 200 OK" in (
        message
    )
    assert "use --claims lease" in message and "docs/operations.md" in message
    assert kfp.runs == {} and not list(storage.list_files(f"{state}/releases")), "nothing claimed, nothing submitted"
    # A quiet poll (nothing new) neither probes nor writes.
    conditional._probes.clear()
    dropped = proxy.dropped
    assert watch.watch(f"{bucket}/empty-inbox", state, output_root=f"{bucket}/runs", claims="s3") == []
    assert proxy.dropped == dropped and not conditional._probes


def test_two_watcher_processes_on_a_lax_store_fall_back_to_leases_and_submit_once(lax_s3, kfp, tmp_path):
    """The store ignores If-None-Match, so claim files cannot keep two watchers apart; --claims auto notices (the
    probe) and claims through Leases on the Kubernetes API (the stand-in, reached through KUBECONFIG)."""
    bucket, proxy = lax_s3
    inbox, state = f"{bucket}/inbox", f"{bucket}/state"
    versions = ("24.0-2025-12-05", "25.0-2026-03-09")
    for version in versions:
        _archive(inbox, f"cv-corpus-{version}-es")
    kfp.run_delay = 0.3
    package = compile_fake_training_pipeline(str(tmp_path))
    with StandinK8s() as api:
        env = cli_env(KUBECONFIG=api.kubeconfig(tmp_path / "kubeconfig", "kubeflow"))
        command = _watch_command(inbox, state, f"{bucket}/runs", kfp, package, "--claims", "auto")
        actions, errs = _watcher_processes(command, env, 2)
        leases = dict(api.leases)
    # A watcher that starts after the other recorded both releases has nothing to claim, so it never probes the
    # store (a quiet poll writes nothing): one of them at least fell back to Leases, and each release ran once.
    assert any("claiming through Kubernetes Leases in namespace kubeflow" in err for err in errs)
    assert actions.count("submitted") == 2 and "failed" not in actions, actions
    assert _runs_by_release(kfp) == {f"habla-cv-corpus-{v}-es": 1 for v in versions}
    assert proxy.dropped > 0, "the conditional headers really were dropped"
    # One Lease per release, released once the run was recorded.
    assert sorted(name.split("-releases-")[1] for _, name in leases) == [f"cv-corpus-{v}-es" for v in versions]
    for lease in leases.values():
        assert "holderIdentity" not in lease["spec"] and lease["metadata"]["annotations"]["habla.dev/status"] == (
            "submitted"
        )
    assert {r["claims"] for r in watch.read_results(state).values()} == {"lease"}


def test_auto_without_a_kubernetes_api_refuses_in_one_line(lax_s3, kfp, tmp_path):
    bucket, _ = lax_s3
    inbox = f"{bucket}/inbox"
    _archive(inbox, "cv-corpus-25.0-2026-03-09-es")
    package = compile_fake_training_pipeline(str(tmp_path))
    env = cli_env(KUBECONFIG=str(tmp_path / "no-kubeconfig"))
    command = _watch_command(inbox, f"{bucket}/state", f"{bucket}/runs", kfp, package)  # --claims auto by default
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "does not enforce conditional writes" in result.stderr
    assert "--claims auto found no Kubernetes API for a Lease: no Kubernetes access" in result.stderr
    assert kfp.runs == {}


def test_lease_claims_keep_watcher_threads_apart_and_a_crashed_holder_off_until_it_expires(kfp, tmp_path):
    inbox, state, out = str(tmp_path / "inbox"), str(tmp_path / "state"), str(tmp_path / "out")
    for version in ("17.0-2024-03-15", "25.0-2026-03-09"):
        _archive(inbox, f"cv-corpus-{version}-es")
    kfp.run_delay = 0.2
    with StandinK8s() as api:
        options = {
            "output_root": out,
            "host": kfp.url,
            "package": kfp.package,
            "claims": "lease",
            "lease_namespace": "ml",
        }
        decisions = _watchers_together(3, lambda: watch.watch(inbox, state, kube_client=api.api_client(), **options))
        assert [d.action for d in decisions].count("submitted") == 2 and len(kfp.runs) == 2

        # A watcher that died after creating the run, before recording it, still holds its Lease: others keep
        # off until it expires, then adopt the Lease and the run (no second run).
        name = "cv-corpus-25.0-2026-03-09-es"
        Path(state, "releases", name, "result.json").unlink()
        [key] = [k for k in api.leases if k[1].endswith(name)]
        api.leases[key]["spec"].update(holderIdentity="pod-x", leaseDurationSeconds=900)
        api.leases[key]["spec"]["renewTime"] = watch._now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        [busy] = [d for d in watch.watch(inbox, state, kube_client=api.api_client(), **options) if d.release == name]
        assert busy.action == "in-progress" and "pod-x" in busy.detail
        api.leases[key]["spec"]["renewTime"] = "2000-01-01T00:00:00.000000Z"
        transitions = api.leases[key]["spec"].get("leaseTransitions", 0)
        [adopted] = [d for d in watch.watch(inbox, state, kube_client=api.api_client(), **options) if d.release == name]
        assert adopted.action == "adopted" and len(kfp.runs) == 2
        assert api.leases[key]["spec"]["leaseTransitions"] == transitions + 1


def test_two_watcher_processes_racing_on_real_seaweedfs_submit_each_release_once(seaweedfs_bucket, kfp, tmp_path):
    """KFP's own object store (SeaweedFS 4.34) passes the probe, so --claims s3 keeps racing watchers apart."""
    inbox, state = f"{seaweedfs_bucket}/inbox", f"{seaweedfs_bucket}/state"
    versions = ("24.0-2025-12-05", "25.0-2026-03-09")
    for version in versions:
        _archive(inbox, f"cv-corpus-{version}-es")
    kfp.run_delay = 0.3
    package = compile_fake_training_pipeline(str(tmp_path))
    command = _watch_command(inbox, state, f"{seaweedfs_bucket}/runs", kfp, package, "--claims", "s3")
    actions, _ = _watcher_processes(command, cli_env(), 3)
    assert actions.count("submitted") == 2 and "failed" not in actions, actions
    assert _runs_by_release(kfp) == {f"habla-cv-corpus-{v}-es": 1 for v in versions}
    assert {r["claims"] for r in watch.read_results(state).values()} == {"s3"}


def test_an_unknown_claims_mode_is_one_line(tmp_path, capsys):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    args = ["watch", "--inbox", str(inbox), "--state", str(tmp_path / "s"), "--dry-run", "--claims", "sometimes"]
    assert cli.main(args) == 2
    assert capsys.readouterr().err.strip().endswith("--claims 'sometimes': expected one of s3, lease, auto")
    assert not (tmp_path / "s").exists()


def test_resubmit_submits_a_release_anew_into_a_folder_of_its_own(kfp, tmp_path):
    """A release whose run failed (or that must be trained again) is submitted anew with --resubmit: the earlier
    result is kept aside, the new run is never the adopted old one, and its run folder is not the old run's (whose
    run.json names another run id: start_run would refuse it). Later polls leave it alone; a crash after the new
    run was created is adopted as that new run."""
    inbox, state, out = str(tmp_path / "inbox"), str(tmp_path / "state"), str(tmp_path / "out")
    name = "cv-corpus-25.0-2026-03-09-es"
    _archive(inbox, name)
    [first] = watch.watch(inbox, state, output_root=out, host=kfp.url, package=kfp.package)
    kfp.runs[first.run_id]["state"] = "FAILED"
    [known] = watch.watch(inbox, state, output_root=out, host=kfp.url, package=kfp.package)
    assert known.action == "known"

    [again] = watch.watch(inbox, state, output_root=out, host=kfp.url, package=kfp.package, resubmit=name)
    assert again.action == "submitted" and again.run_id != first.run_id
    folders = [r["runtime_config"]["parameters"]["run_name"] for r in kfp.runs.values()]
    assert folders == [f"habla-{name}", f"habla-{name}-2"]
    assert {r["display_name"] for r in kfp.runs.values()} == {f"habla-{name}"}
    release = Path(state, "releases", name)
    assert json.loads((release / "result.json").read_text())["run_id"] == again.run_id
    [kept] = release.glob("result-*.json")
    assert json.loads(kept.read_text())["run_id"] == first.run_id

    # a crash between the new run and its result: the next poll adopts the newest run of that name, the new one
    resubmitting = {"release": name, "status": "resubmitting", "replaces": first.run_id}
    (release / "result.json").write_text(json.dumps(resubmitting))
    [adopted] = watch.watch(inbox, state, output_root=out, host=kfp.url, package=kfp.package)
    assert adopted.action == "adopted" and adopted.run_id == again.run_id and len(kfp.runs) == 2
    assert json.loads((release / "result.json").read_text())["run_id"] == again.run_id
    # a resubmission whose new run was never created (KFP refused it): the replaced run is never adopted
    (release / "result.json").write_text(json.dumps({**resubmitting, "replaces": again.run_id}))
    [third] = watch.watch(inbox, state, output_root=out, host=kfp.url, package=kfp.package)
    assert third.action == "submitted" and third.run_id not in (first.run_id, again.run_id) and len(kfp.runs) == 3
    assert [r["runtime_config"]["parameters"]["run_name"] for r in kfp.runs.values()][-1] == f"habla-{name}-3"
    with pytest.raises(HablaError, match="no such release"):
        watch.watch(inbox, state, output_root=out, host=kfp.url, package=kfp.package, resubmit="cv-corpus-9.0-x-es")
