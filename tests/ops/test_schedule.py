"""habla schedule: the watcher pipeline, and an idempotent KFP recurring run (against the stand-in server)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from fixtures.releases import ROOT
from habla.pipelines import training_pipeline, watcher_pipeline
from standins.kfp_server import KfpStandin, compile_fake_training_pipeline

from habla import cli
from habla.core.errors import HablaError
from habla.kubeflow import kfp_api, recurring
from habla.kubeflow.compile import DEFAULT_PREP_IMAGE
from habla.ops import schedule

ARGS = [
    "--cron",
    "0 0 6 * * *",
    "--inbox",
    "s3://cv/inbox",
    "--state",
    "s3://cv/state",
    "--output-root",
    "s3://cv/runs",
    "--param",
    "nodes=2",
]


def test_cron_needs_six_fields_seconds_first():
    assert schedule.validate_cron(" 0  0 6 * *  1-5") == "0 0 6 * * 1-5"
    assert schedule.validate_cron("0 */30 * * * ?") == "0 */30 * * * ?"
    with pytest.raises(HablaError, match=r"did you mean '0 0 6 \* \* \*'"):
        schedule.validate_cron("0 6 * * *")
    with pytest.raises(HablaError, match="6 fields"):
        schedule.validate_cron("every day")


def test_watcher_pipeline_runs_in_the_habla_image_without_installing_anything(tmp_path):
    package = watcher_pipeline.compile_pipeline(str(tmp_path / "w.yaml"))
    spec, platform = list(yaml.safe_load_all(Path(package).read_text()))
    [executor] = spec["deploymentSpec"]["executors"].values()
    container = executor["container"]
    assert container["image"] == DEFAULT_PREP_IMAGE == "ghcr.io/habla-asr/habla-prep:0.1.0"
    assert "pip install" not in " ".join(container["command"])  # install_kfp_package=False, no packages_to_install
    [task] = spec["root"]["dag"]["tasks"].values()
    assert task["cachingOptions"] == {}  # caching off: a cached poll would never look at the inbox
    [env] = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
    secrets = {s["secretName"]: s for s in env["secretAsEnv"]}
    assert {k["envVar"] for k in secrets["habla-s3-credentials"]["keyToEnv"]} == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    assert secrets["habla-mdc"]["optional"] is True


def test_schedule_is_idempotent_and_follows_changes(tmp_path, capsys):
    with KfpStandin() as kfp:
        base = ["schedule", "--host", kfp.url, *ARGS]
        assert cli.main(base) == 0
        assert "created" in capsys.readouterr().out
        [rr] = kfp.recurring_runs.values()
        assert rr["display_name"] == "habla-release-watcher"
        assert rr["trigger"]["cron_schedule"]["cron"] == "0 0 6 * * *"
        assert (str(rr["max_concurrency"]), rr["no_catchup"], rr["mode"]) == ("1", True, "ENABLE")
        params = rr["runtime_config"]["parameters"]
        assert params["inbox"] == "s3://cv/inbox" and json.loads(params["training_params"]) == {"nodes": 2}
        assert params["kfp_host"] == watcher_pipeline.IN_CLUSTER_KFP  # defaults passed explicitly
        experiment = kfp.experiments[rr["experiment_id"]]["display_name"]
        assert experiment == "habla-watcher"

        # The same call again changes nothing: no upload, no new recurring run.
        before = len(kfp.requests)
        assert cli.main(base) == 0
        assert "unchanged" in capsys.readouterr().out
        writes = [r for r in kfp.requests[before:] if r[0] != "GET"]
        assert writes == [] and list(kfp.recurring_runs) == [rr["recurring_run_id"]]

        # A new cron replaces it: still one recurring run.
        assert cli.main([*base, "--cron", "0 30 5 * * 1-5"]) == 0
        assert "updated" in capsys.readouterr().out
        [new] = kfp.recurring_runs.values()
        assert new["recurring_run_id"] != rr["recurring_run_id"]
        assert new["trigger"]["cron_schedule"]["cron"] == "0 30 5 * * 1-5"

        assert cli.main(["schedule", "--host", kfp.url, "--delete"]) == 0
        assert kfp.recurring_runs == {}
        assert "deleted 1" in capsys.readouterr().out


def test_a_changed_pipeline_gets_a_new_version_and_the_schedule_moves_to_it(tmp_path):
    first = compile_fake_training_pipeline(str(tmp_path))
    changed = tmp_path / "changed.yaml"
    changed.write_text(Path(first).read_text().replace("python:3.11-slim", "python:3.12-slim"))
    with KfpStandin() as kfp:
        client = kfp_api.connect(kfp.url)
        common = {
            "name": "nightly",
            "experiment": "e",
            "cron": "0 0 1 * * *",
            "params": {"release_uri": "s3://a", "output_uri": "s3://b"},
        }
        one = recurring.ensure_recurring_run(client, package_path=first, **common)
        same = recurring.ensure_recurring_run(client, package_path=first, **common)
        two = recurring.ensure_recurring_run(client, package_path=str(changed), **common)
        assert (one.action, same.action, two.action) == ("created", "unchanged", "updated")
        assert one.version_id == same.version_id != two.version_id
        assert len(kfp.versions) == 2 and len(kfp.pipelines) == 1
        [rr] = kfp.recurring_runs.values()
        assert rr["pipeline_version_reference"]["pipeline_version_id"] == two.version_id


def test_the_watcher_component_submits_through_the_api(tmp_path, monkeypatch):
    package = compile_fake_training_pipeline(str(tmp_path))
    monkeypatch.setattr(training_pipeline, "compile_into", lambda folder, options=None: package)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "cv-corpus-25.0-2026-03-09-es.tar.gz").write_bytes(b"x")
    (inbox / "cv-corpus-25.0-2026-03-09-es.tar.gz.sha256").write_text("0" * 64)  # uploaded whole (habla watch)
    with KfpStandin() as kfp:
        report = watcher_pipeline.watch_releases.python_func(
            inbox=str(inbox),
            state=str(tmp_path / "state"),
            output_root=str(tmp_path / "runs"),
            experiment="habla",
            locale="es",
            kfp_host=kfp.url,
            training_params='{"nodes": 2}',
            s3_endpoint_url="",
            mdc=False,
            dry_run=False,
            compile_options="",
        )
        [run] = kfp.runs.values()
    assert json.loads(report)[0]["action"] == "submitted"
    assert run["runtime_config"]["parameters"]["nodes"] == 2


def test_schedule_reports_bad_input_in_one_line(capsys):
    assert cli.main(["schedule", "--host", "http://127.0.0.1:9", "--cron", "0 6 * * *"]) == 2
    assert "--inbox, --state, --output-root required" in capsys.readouterr().err
    assert cli.main(["schedule", "--host", "localhost:8888", *ARGS]) == 2
    assert "must start with http" in capsys.readouterr().err


def test_cronjob_alternative_runs_habla_watch_with_credentials_from_the_secret():
    folder = ROOT / "manifests" / "cronjob"
    docs = [d for f in sorted(folder.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    assert not any(d.get("kind") == "Secret" for d in docs)  # no credentials in the repository
    [cron] = [d for d in docs if d.get("kind") == "CronJob"]
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5 and spec["concurrencyPolicy"] == "Forbid"
    [container] = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == DEFAULT_PREP_IMAGE
    assert container["command"] == ["habla"] and container["args"][0] == "watch"
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert refs["AWS_ACCESS_KEY_ID"]["name"] == refs["AWS_SECRET_ACCESS_KEY"]["name"] == "habla-s3-credentials"
    args = cli.build_parser().parse_args([a.replace("$(", "").replace(")", "") for a in container["args"]])
    assert args.command == "watch"  # every flag the CronJob passes exists
    kubectl = shutil.which("kubectl")
    if kubectl:  # kustomize renders it (no cluster needed)
        rendered = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, check=True)
        assert "kind: CronJob" in rendered.stdout and "HABLA_INBOX" in rendered.stdout


def test_the_standin_rejects_what_kfp_server_api_models_reject():
    import urllib.error
    import urllib.request

    def post(url: str, body: dict) -> tuple[int, str]:
        request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    with KfpStandin() as kfp:
        api = f"{kfp.url}/apis/v2beta1"
        assert post(f"{api}/experiments", {"display_name": "e"})[0] == 200
        status, body = post(f"{api}/experiments", {"display_name": "f", "colour": "red"})
        assert status == 400 and "unknown field 'colour'" in body
        status, body = post(f"{api}/recurringruns", {"display_name": "r", "mode": "SOMETIMES"})
        assert status == 400 and "RecurringRunMode" in body
        status, body = post(f"{api}/runs", {"display_name": "r", "runtime_config": {"parameters": []}})
        assert status == 400 and "expected an object" in body


def test_compile_options_reach_the_training_pipeline_the_watcher_submits(tmp_path):
    """habla schedule --prep-image/--train-image/--conversion-parallelism → the watcher pipeline → the
    training pipeline its component compiles and submits (nothing read from the environment)."""
    options = ["--prep-image", "reg.example/prep:7", "--train-image", "reg.example/train:7"]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "cv-corpus-25.0-2026-03-09-es.tar.gz").write_bytes(b"x")
    (inbox / "cv-corpus-25.0-2026-03-09-es.tar.gz.sha256").write_text("0" * 64)  # uploaded whole (habla watch)
    with KfpStandin() as kfp:
        args = ["schedule", "--host", kfp.url, *ARGS, *options, "--conversion-parallelism", "3"]
        assert cli.main(args) == 0
        [watcher] = [v["pipeline_spec"] for v in kfp.versions.values()]
        executor = next(iter(watcher["deploymentSpec"]["executors"].values()))["container"]
        assert executor["image"] == "reg.example/prep:7"
        task = watcher["root"]["dag"]["tasks"]["watch-releases"]
        compile_options = task["inputs"]["parameters"]["compile_options"]["runtimeValue"]["constant"]
        assert json.loads(compile_options)["conversion_parallelism"] == 3

        # What the watcher's pod does with it: compile habla's real training pipeline and submit it.
        watcher_pipeline.watch_releases.python_func(
            inbox=str(inbox), state=str(tmp_path / "state"), output_root=str(tmp_path / "out"),
            experiment="habla", locale="es", kfp_host=kfp.url, training_params="{}", s3_endpoint_url="",
            mdc=False, dry_run=False, compile_options=compile_options,
        )  # fmt: skip
        [training] = [v["pipeline_spec"] for v in kfp.versions.values() if v["pipeline_spec"] != watcher]
    loop = training["components"]["comp-convert-dataset"]["dag"]["tasks"]["for-loop-1"]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    images = {name: e["container"]["image"] for name, e in training["deploymentSpec"]["executors"].items()}
    assert images["exec-convert-shard"] == "reg.example/prep:7" and images["exec-train-here"] == "reg.example/train:7"
    assert training["root"]["inputDefinitions"]["parameters"]["train_image"]["defaultValue"] == "reg.example/train:7"


def test_claims_reach_the_watcher_pipeline_and_its_component(tmp_path, capsys):
    """habla schedule --claims lease becomes the watcher pipeline's ``claims`` parameter (default auto), which the
    component hands to habla.kubeflow.watch.watch."""
    with KfpStandin() as kfp:
        assert cli.main(["schedule", "--host", kfp.url, *ARGS]) == 0
        assert cli.main(["schedule", "--host", kfp.url, *ARGS, "--name", "leased", "--claims", "lease"]) == 0
        claims = {
            rr["display_name"]: rr["runtime_config"]["parameters"]["claims"] for rr in kfp.recurring_runs.values()
        }
    assert claims == {"habla-release-watcher": "auto", "leased": "lease"}
    with pytest.raises(SystemExit) as exited:  # bad input: one line and exit 2 (habla.core.errors.pipeline_step)
        watcher_pipeline.watch_releases.python_func(
            inbox=str(tmp_path), state=str(tmp_path / "state"), output_root=str(tmp_path / "out"),
            experiment="habla", locale="es", kfp_host="http://127.0.0.1:9", training_params="{}",
            s3_endpoint_url="", mdc=False, dry_run=False, compile_options="", claims="sometimes",
        )  # fmt: skip
    assert exited.value.code == 2
    assert "--claims 'sometimes': expected one of s3, lease, auto" in capsys.readouterr().err


@pytest.mark.parametrize("kfp", ["2.16.0", "2.17.0"])
def test_the_docs_name_the_time_zone_setting_of_kfps_scheduler(kfp):
    """KFP's scheduler reads every recurring run's cron in the zone of pipeline-install-config's
    cronScheduleTimezone (vendored from KFP's manifests), which docs/operations.md tells the operator to set."""
    config = yaml.safe_load((ROOT / "tests" / "kubeflow" / "upstream" / f"kfp-{kfp}" / "pipeline-install-config.yaml")
                            .read_text())  # fmt: skip
    assert config["metadata"]["name"] == "pipeline-install-config" and config["data"]["cronScheduleTimezone"] == "UTC"
    docs = (ROOT / "docs" / "operations.md").read_text()
    assert "`cronScheduleTimezone`" in docs and "`pipeline-install-config`" in docs and "CRON_SCHEDULE_TIMEZONE" in docs


def test_dry_run_shows_a_weekly_schedule_without_kfp(capsys):
    """`habla schedule --dry-run`: everything checked, nothing contacted (no --host); the day-of-week field of
    KFP's 6-field cron counts from 0 = Sunday (SUN), and 7 is refused."""
    weekly = ["schedule", "--cron", "0 0 3 * * SUN", "--inbox", "s3://b/inbox", "--state", "s3://b/state",
              "--output-root", "s3://b/out", "--dry-run"]  # fmt: skip
    assert cli.main(weekly) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["cron"] == "0 0 3 * * SUN" and planned["days_of_week"] == ["SUN"]
    assert planned["fields"]["hour"] == "3" and planned["max_concurrency"] == 1
    assert cli.main([*weekly[:2], "0 0 3 * * 0", *weekly[3:]]) == 0
    assert json.loads(capsys.readouterr().out)["days_of_week"] == ["SUN"]
    assert cli.main([*weekly[:2], "0 0 3 * * 7", *weekly[3:]]) == 2
    assert "day-of-week" in capsys.readouterr().err
