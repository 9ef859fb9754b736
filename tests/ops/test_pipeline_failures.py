"""How `habla pipeline run-local` fails and resumes, through the real kfp.local: bad input fails once and at once
(a step's exit 2 is never retried), a fault is retried as the step's retry policy says, and a run's state
(succeeded, failed, interrupted) is in run.json and `habla compare`; an interrupted run resumes."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fixtures.commands import HABLA, cli_env, run_habla
from kfp import dsl, local

from habla.ops.pipeline_runs import _no_retry_on_bad_input


@dsl.component(base_image="python:3.11", install_kfp_package=False)  # KFP reads the annotations: no __future__
def flaky(counter: str) -> str:
    """Fails with a fault (exit 1) on its first attempt, succeeds on the second."""
    import os

    from habla.core.errors import pipeline_step

    with pipeline_step("flaky"):
        with open(counter, "a") as f:
            f.write("x")
        if os.path.getsize(counter) == 1:
            raise OSError("the disk went away")
        return "done"


@dsl.component(base_image="python:3.11", install_kfp_package=False)  # KFP reads the annotations: no __future__
def refuses(counter: str) -> str:
    """Ends on bad input (habla's HablaError) on every attempt."""
    from habla.core.errors import HablaError, pipeline_step

    with pipeline_step("refuses"):
        with open(counter, "a") as f:
            f.write("x")
        raise HablaError("the release has no train.tsv")


@dsl.pipeline
def flaky_pipeline(counter: str):
    flaky(counter=counter).set_retry(num_retries=3, backoff_duration="1s", backoff_factor=1.0)


@dsl.pipeline
def refusing_pipeline(counter: str):
    refuses(counter=counter).set_retry(num_retries=3, backoff_duration="30s")


def test_kfp_local_retries_a_fault_but_not_bad_input(tmp_path, capfd):
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               raise_on_error=False)  # fmt: skip
    with _no_retry_on_bad_input():
        flaky_pipeline(counter=str(tmp_path / "flaky"))
        started = time.monotonic()
        refusing_pipeline(counter=str(tmp_path / "refuses"))
        refused_in = time.monotonic() - started
    assert (tmp_path / "flaky").read_text() == "xx"  # the fault was retried, and the retry succeeded
    assert (tmp_path / "refuses").read_text() == "x"  # bad input: one attempt, no 30 s wait
    assert refused_in < 25
    printed = capfd.readouterr()
    text = printed.out + printed.err
    assert text.count("habla refuses: error: the release has no train.tsv (bad input: exit 2, not retried)") == 1
    assert "HablaError" not in text  # one line, never a traceback
    assert "os.environ" not in text and "HABLA_BAD_INPUT_DIR" not in os.environ  # the environment is restored


def test_bad_input_fails_the_run_once_and_at_once(tmp_path):
    """A release without its TSVs: plan-dataset (retry policy: 2 retries, 60 s apart) fails once, in seconds,
    with one line; the run is recorded as failed on bad input."""
    release = tmp_path / "release"
    (release / "clips").mkdir(parents=True)
    out = tmp_path / "out"
    started = time.monotonic()
    result = run_habla("pipeline", "run-local", "--release", str(release), "--out", str(out), "--run-name", "r",
                       timeout=600)  # fmt: skip
    took = time.monotonic() - started
    errors = [line for line in result.stderr.splitlines() if line.startswith("habla pipeline: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "the pipeline failed at step plan-dataset" in errors[0] and "resumes" not in errors[0]
    assert took < 55, took  # the first retry alone would have waited 60 s
    log = (out / "runs" / "r" / "logs" / "plan-dataset.log").read_text()
    assert log.count("habla plan-dataset: error:") == 1 and "Traceback" not in log
    record = json.loads((out / "runs" / "r" / "run.json").read_text())
    assert record["state"] == "failed" and record["failed_step"] == "plan-dataset" and record["bad_input"] is True
    rows = json.loads(run_habla("compare", str(out / "runs" / "r"), "--format", "json").stdout)
    assert rows[0]["state"] == "failed"
    # the same name again is refused in one line: a run that failed on bad input is not resumed
    again = run_habla("pipeline", "run-local", "--release", str(release), "--out", str(out), "--run-name", "r")
    assert again.returncode == 2 and "habla pipeline: error:" in again.stderr and "Traceback" not in again.stderr


def test_a_mistyped_parameter_or_override_is_refused_before_any_step(tmp_path):
    out = tmp_path / "out"
    typo = run_habla("pipeline", "run-local", "--out", str(out), "promotion_margn=0.1")
    assert typo.returncode == 2 and "did you mean promotion_margin?" in typo.stderr, typo.stderr
    override = run_habla("pipeline", "run-local", "--out", str(out), "trainer.max_stpes=5")
    assert override.returncode == 2 and "did you mean trainer.max_steps?" in override.stderr, override.stderr
    assert not (out / "datasets").exists() and not (out / "runs").exists()  # no step ran


def test_run_local_help_lists_the_pipeline_parameters():
    result = run_habla("pipeline", "run-local", "--help")
    assert result.returncode == 0
    for line in ("num_shards=", "promotion_margin=", 'config="tiny_ctc_char"', 'audio_format="wav"'):
        assert line in result.stdout, line


@pytest.mark.slow
def test_an_interrupted_run_is_recorded_and_resumes(tmp_path):
    """Ctrl-C during training (SIGINT to the process group, as a terminal sends it): exit 130, run.json says
    interrupted; the same command again resumes the run (the data steps reused) and it succeeds."""
    out = tmp_path / "out"
    command = [HABLA, "pipeline", "run-local", "--out", str(out), "--run-name", "r", "trainer.max_steps=40"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
                            start_new_session=True)  # fmt: skip
    log = out / "runs" / "r" / "logs" / "pipeline.log"
    deadline = time.monotonic() + 600
    while not (log.is_file() and "Executing task 'train-here'" in log.read_text(errors="replace")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(1)
    time.sleep(5)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "the same command resumes it" in stderr
    record = json.loads((out / "runs" / "r" / "run.json").read_text())
    assert record["state"] == "interrupted" and record["failed_step"] == "train-here"
    rows = json.loads(run_habla("compare", str(out / "runs" / "r"), "--format", "json").stdout)
    assert rows[0]["state"] == "interrupted"

    again = subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=900, check=False)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming run r (interrupted at step train-here)" in again.stdout
    record = json.loads((out / "runs" / "r" / "run.json").read_text())
    assert record["state"] == "succeeded" and len(record["resumed"]) == 1
    assert record["resumed"][0]["state"] == "interrupted"
    assert len(list((out / "datasets").iterdir())) == 1
    assert Path(out / "runs" / "r" / "eval" / "metrics.json").is_file()
    report = (out / "runs" / "r" / "eval" / "report.md").read_text()  # the local report carries the verdict
    assert "## Against the current best model" in report and "this output folder had no promoted model yet" in report
    rows = json.loads(run_habla("compare", str(out / "runs" / "r"), "--format", "json").stdout)
    assert rows[0]["state"] == "succeeded"
