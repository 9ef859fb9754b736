"""``habla launch``: the operators' command over habla.kubeflow."""

from __future__ import annotations

from conftest import SECRET_VALUE

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
    argv += ["--env", "AWS_ENDPOINT_URL=http://s3:9000", "--dry-run", "--", "--data", "s3://b/d"]
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
