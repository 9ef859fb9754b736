"""run-local's console: one line per step, progress with an ETA for long steps, everything else in log files.

A child process prints what kfp.local and the steps print (so the redirection of this process's file
descriptors is exercised as in a run); the real pipeline run is in test_pipeline_local.py (slow)."""

from __future__ import annotations

import os
import subprocess
import sys

from habla.ops.pipeline_runs import StepConsole

STEPS = r"""
import sys, time
def say(text):
    print(text, flush=True)
say("13:00:00.000 - INFO - Running pipeline: \x1b[96m'habla-train'\x1b[0m")
say("13:00:00.001 - INFO - Executing task \x1b[96m'train-here'\x1b[0m")
say('    [KFP Executor 2026-11-25 13:00:00,100 INFO]: Got executor_input:')
say('    {"inputs": {"parameterValues": {"config": "tiny_ctc_char"}}}')
say('    [NeMo I 2026-11-25 13:00:01 ctc_models:64] labels: [" ", "a", "b"]')
for step in (100, 200, 300):
    say(f'    13:00:02 INFO habla.train: step {step}/400 epoch 1 loss 3.0')
    time.sleep(0.05)
print("    a warning from a library", file=sys.stderr, flush=True)
say("13:00:05.000 - INFO - Task \x1b[96m'train-here'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m")
say("13:00:05.001 - INFO - Executing task \x1b[96m'evaluate-models'\x1b[0m")
say("    habla evaluate: error: --model /x/model.nemo: no such file")
say("    Traceback (most recent call last):")
say("13:00:06.000 - ERROR - Task \x1b[96m'evaluate-models'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m")
say("13:00:06.001 - INFO - Skipping conditional task 'condition-3'")
"""


def test_one_line_per_step_progress_and_full_logs(tmp_path, capfd):
    console = StepConsole(tmp_path / "logs")
    console.LONG_STEP = console.PROGRESS_EVERY = 0.0  # report progress at once (a real step waits a minute)
    with console.capturing():
        subprocess.run([sys.executable, "-c", STEPS], check=True)
        os.write(1, b"written by this process\n")
    shown = capfd.readouterr()
    lines = shown.out.splitlines()
    # the training loss on the console; the ETA from the rate since the first progress line (not since the step
    # started: its imports and data loading are not training)
    assert lines[0].startswith("  … train-here: 100/400 (25 %)") and "loss 3.0" in lines[0] and "ETA" not in lines[0]
    assert lines[1].startswith("  … train-here: 200/400 (50 %)") and "ETA" in lines[1] and "loss 3.0" in lines[1]
    assert lines[-3].startswith("✓ train-here") and "SUCCESS" in lines[-3]
    assert lines[-2].startswith("✗ evaluate-models") and "FAILURE" in lines[-2]
    assert lines[-1] == "    | habla evaluate: error: --model /x/model.nemo: no such file"  # the one-line reason
    assert "executor_input" not in shown.out + shown.err and "NeMo" not in shown.out and not shown.err
    train_log = (tmp_path / "logs" / "train-here.log").read_text()
    assert "Got executor_input" in train_log and "labels:" in train_log and "a warning from a library" in train_log
    assert "\x1b[" not in train_log and "step 300/400" in train_log
    everything = (tmp_path / "logs" / "pipeline.log").read_text()
    assert "written by this process" in everything and "Running pipeline" in everything
    assert [s["status"] for s in console.steps] == ["SUCCESS", "FAILURE", "SKIPPED"] and console.failed == [
        "evaluate-models"
    ]


def test_a_failed_step_says_whether_it_was_given_bad_input(tmp_path):
    """What run-local exits with when a step failed: 2 for a HablaError (bad input), 1 for anything else."""
    from habla.ops.pipeline_runs import step_failure

    logs = {
        # kfp.local streams a step's output indented by 4 spaces
        "bad": "    Traceback (most recent call last):\n      File x\n"
        "    habla.core.state.Corrupt: /o/models/best.json: corrupt (x)\n",
        "fault": "Traceback (most recent call last):\n  File x\nhabla.core.errors.Fault: cannot reach bucket s3://b: "
        "EndpointConnectionError\n",
        "bug": "Traceback (most recent call last):\n  File x\nKeyError: 'wer'\n",
        "killed": "step 10/400 loss 3.1\n",
    }
    for name, text in logs.items():
        (tmp_path / f"{name}.log").write_text(text)
    assert step_failure(tmp_path / "bad.log") == (True, "/o/models/best.json: corrupt (x)")
    assert step_failure(tmp_path / "fault.log") == (False, "cannot reach bucket s3://b: EndpointConnectionError")
    assert step_failure(tmp_path / "bug.log") == (False, "'wer'")
    assert step_failure(tmp_path / "killed.log") == (False, "step 10/400 loss 3.1")


FAN_OUT = r"""
for shard in (0, 1):
    print("13:00:00.001 - INFO - Executing task 'convert-shard'", flush=True)
    print(f"    converting shard {shard}", flush=True)
    print("13:00:01.000 - INFO - Task 'convert-shard' finished with status SUCCESS", flush=True)
print("13:00:02.001 - INFO - Executing task 'plan-dataset'", flush=True)
print("    habla plan-dataset: error: /r: no train.tsv (bad input: exit 2, not retried)", flush=True)
print("13:00:03.000 - ERROR - Task 'plan-dataset' finished with status FAILURE", flush=True)
"""


def test_each_run_of_a_fanned_out_step_has_its_own_log(tmp_path, capfd):
    from habla.ops.pipeline_runs import step_failure

    console = StepConsole(tmp_path / "logs")
    with console.capturing():
        subprocess.run([sys.executable, "-c", FAN_OUT], check=True)
    capfd.readouterr()
    assert "shard 0" in (tmp_path / "logs" / "convert-shard.log").read_text()
    second = (tmp_path / "logs" / "convert-shard-2.log").read_text()
    assert "shard 1" in second and "shard 0" not in second
    assert step_failure(console.logs["plan-dataset"]) == (True, "/r: no train.tsv")  # the step's own verdict


CONCURRENT = r"""
print("13:00:00.001 - INFO - Executing task 'convert-shard'", flush=True)
print("13:00:00.002 - INFO - Executing task 'convert-shard'", flush=True)
for shard in (0, 1):
    print(f"    converting shard {shard}", flush=True)
for _ in (0, 1):
    print("13:00:01.000 - INFO - Task 'convert-shard' finished with status SUCCESS", flush=True)
"""


def test_iterations_running_at_once_share_one_log(tmp_path, capfd):
    """kfp.local (2.17) runs a ParallelFor's iterations at once, their lines interleaved (seen in a real run-local
    of the bundled release): no line can be told apart, so they share one log, and every console line names it."""
    console = StepConsole(tmp_path / "logs")
    with console.capturing():
        subprocess.run([sys.executable, "-c", CONCURRENT], check=True)
    out = capfd.readouterr().out
    log = (tmp_path / "logs" / "convert-shard.log").read_text()
    assert "shard 0" in log and "shard 1" in log and not (tmp_path / "logs" / "convert-shard-2.log").exists()
    assert out.count("log: " + str(tmp_path / "logs" / "convert-shard.log")) == 2
