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
    assert lines[0].startswith("  … train-here: 100/400 (25 %)") and "ETA" in lines[0]
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
