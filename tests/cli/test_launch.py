"""``habla launch``: the operators' command over habla.kubeflow."""

from __future__ import annotations

import json

from fixtures.cluster import SECRET_VALUE
from fixtures.commands import write_manifest

from habla import cli

# ------------------------------------------------------------------------------------------- habla launch


def launch_cli(argv: list[str]) -> int:
    import argparse

    from habla.cli import launch as launch_command

    parser = argparse.ArgumentParser()
    launch_command.add_arguments(parser)
    return launch_command.run(parser.parse_args(argv))


def test_launch_dry_run_prints_the_job(capsys, monkeypatch):
    import yaml

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    argv = ["--kind", "pytorchjob", "--image", "reg/habla-train:1", "--nodes", "2", "--gpus-per-node", "2"]
    argv += ["--env", "AWS_ENDPOINT_URL=http://s3:9000", "--dry-run", "--no-plan", "--", "--data", "s3://b/d"]
    assert launch_cli(argv) == 0
    out = capsys.readouterr().out
    job = yaml.safe_load(out)
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["command"][-4:] == ["habla", "train", "--data", "s3://b/d"]
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert SECRET_VALUE not in out and "&id" not in out


def test_launch_bad_input_is_one_line(capsys):
    code = cli.main(["launch", "--kind", "trainjob", "--dry-run", "--env", "NOEQUALS"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("habla launch: error:") and "\n" not in err


def _manifest(tmp_path, clips: int = 64):
    entries = [{"audio_filepath": f"clips/c{i}.wav", "text": "hola", "duration": 2.0 + i % 5} for i in range(clips)]
    return str(write_manifest(entries, tmp_path / "train.json"))


def test_launch_plans_the_run_and_its_pods_ask_for_the_plans_node(tmp_path, capsys):
    import yaml

    train = ["--config", "fastconformer_ctc_bpe", "--train-manifest", _manifest(tmp_path)]
    argv = ["--kind", "pytorchjob", "--image", "reg/habla-train:1", "--nodes", "8", "--gpus-per-node", "8",
            "--dry-run", "--", *train]  # fmt: skip
    assert launch_cli(argv) == 0
    captured = capsys.readouterr()
    job = yaml.safe_load(captured.out)
    # the same plan habla train --dry-run prints for 8 × 8, in brief on the job
    assert cli.main(["train", *train, "--dry-run", "--nodes", "8", "--gpus-per-node", "8"]) == 0
    plan = json.loads(capsys.readouterr().out)
    brief = json.loads(job["metadata"]["annotations"]["habla.dev/plan"])
    assert brief == {k: plan[k] for k in ("world", "batch", "learning_rate", "schedule", "cadence", "node")}
    assert brief["batch"]["world_size"] == 64 and abs(brief["batch"]["global_batch"] / 2048 - 1) <= 0.1
    resources = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["cpu"] == str(plan["node"]["cpu"])
    assert resources["limits"]["memory"] == plan["node"]["memory"]
    assert [f"plan: {line}" for line in plan["described"]] == captured.err.splitlines()[:3]

    # an explicit request wins over the plan's
    assert launch_cli([*argv[: -len(train) - 1], "--memory", "500Gi", "--", *train]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"][
        "limits"]["memory"] == "500Gi"  # fmt: skip


def test_launch_refuses_a_world_the_global_batch_cannot_hold_before_creating_anything(tmp_path, capsys):
    train = ["--config", "fastconformer_ctc_bpe", "--train-manifest", _manifest(tmp_path)]
    code = cli.main(["launch", "--kind", "trainjob", "--image", "reg/habla-train:1", "--nodes", "512",
                     "--gpus-per-node", "8", "--", *train])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    err = captured.err.strip()
    assert err.startswith("habla launch: error: 4096 devices cannot train on global_batch 2048") and "\n" not in err
