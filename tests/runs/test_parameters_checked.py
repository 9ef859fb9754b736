"""Every parameter a run takes is checked before anything is submitted, scheduled, recorded or run (#22): the
watcher recorded a release as submitted with nodes=0 and never tried it again."""

from __future__ import annotations

import pytest
from standins.kfp_server import KfpStandin

from habla import cli
from habla.core.errors import HablaError
from habla.runs.parameters import RunParameters

BAD = [("nodes=0", "nodes=0: an integer from 1"), ("launcher=bogus", "launcher='bogus': trainjob or pytorchjob"),
       ("config=nonexistent_cfg", "config='nonexistent_cfg': a config name"), ("gpus_per_node=²", "gpus_per_node"),
       ("promotion_margin=nan", "promotion_margin=nan: needs a finite number"), ("num_shards=0", "num_shards=0"),
       ("audio_format=mp3", "audio_format='mp3'"), ("max_steps=-5", "max_steps=-5"),
       ("runtime=Not_A_Name", "runtime='Not_A_Name'"), ("min_duration=25", "min_duration=25.0"),
       ("config_overrides=trainer.max_steps", "is not a dotted key=value override"),
       ("nodes=abc", "nodes needs an integer")]  # fmt: skip


@pytest.mark.parametrize(("setting", "message"), BAD)
def test_submit_refuses_a_bad_parameter_before_talking_to_kfp(setting, message, capsys):
    with KfpStandin() as kfp:
        code = cli.main(["pipeline", "submit", "--host", kfp.url, "--release", "s3://cv/r", "--out", "s3://cv/o",
                         setting])  # fmt: skip
        assert not kfp.requests, "nothing reaches the API"
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and message in err, err


@pytest.mark.parametrize(("setting", "message"), BAD[:4])
def test_run_local_and_schedule_refuse_it_too(setting, message, tmp_path, capsys):
    assert cli.main(["pipeline", "run-local", "--out", str(tmp_path / "out"), setting]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()
    with KfpStandin() as kfp:
        args = ["schedule", "--host", kfp.url, "--cron", "0 0 6 * * *", "--inbox", "s3://cv/i", "--state",
                "s3://cv/s", "--output-root", "s3://cv/o", "--param", setting]  # fmt: skip
        assert cli.main(args) == 2
        assert not kfp.recurring_runs and not kfp.versions
    assert message in capsys.readouterr().err


def test_schedule_refuses_a_cron_that_never_fires_or_kfp_would_refuse(capsys):
    base = ["schedule", "--host", "http://127.0.0.1:9", "--inbox", "s3://i", "--state", "s3://s", "--output-root",
            "s3://o", "--cron"]  # fmt: skip
    for cron, message in (("0 0 0 31 2 *", "never fires"), ("0 0 0 31 2,4,6 *", "never fires"),
                          ("0 60 * * * *", "minute: '60'"), ("0 0 0 L * *", "day-of-month: 'L'"),
                          ("0 0 6 * * 7", "day-of-week: '7'"), ("0 0 */0 * * *", "step")):  # fmt: skip
        assert cli.main([*base, cron]) == 2
        assert message in capsys.readouterr().err, cron


def test_watcher_parameters_are_typed_as_the_pipeline_receives_them():
    checked = RunParameters.checked({"nodes": 2, "gpus_per_node": 8, "max_steps": 300.0}, release_uri="r",
                                    output_uri="o")  # fmt: skip
    assert (checked.nodes, checked.gpus_per_node, checked.max_steps) == (2, "8", 300)
    with pytest.raises(HablaError, match="unknown pipeline parameter"):
        RunParameters.checked({"node": 2}, release_uri="r", output_uri="o")


def test_launch_refuses_labels_kubernetes_would_refuse(capsys):
    for label in ("a b=c", "x=has space", "Bad_Prefix/x=y", "x=" + "a" * 64):
        assert cli.main(["launch", "--kind", "trainjob", "--image", "reg/t:1", "--dry-run", "--label", label]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("habla launch: error: label") and "\n" not in err, err


def test_a_cpu_run_does_not_wait_for_a_gpu_to_evaluate():
    """A run without GPUs whose evaluation asks for one would leave its evaluation pod Pending on a CPU cluster."""
    with pytest.raises(HablaError, match='evaluate_gpus="1" with gpus_per_node="0"'):
        RunParameters.checked({"gpus_per_node": "0", "evaluate_gpus": "1"}, release_uri="r", output_uri="o")
    RunParameters.checked({"gpus_per_node": "0", "evaluate_gpus": "0"}, release_uri="r", output_uri="o")
    RunParameters.checked({"gpus_per_node": "8", "evaluate_gpus": "1"}, release_uri="r", output_uri="o")
