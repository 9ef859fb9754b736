"""Run ``habla train`` under torchrun on this machine (CPU, gloo): one node, or several on loopback."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from habla.core.errors import Fault, HablaError
from habla.kubeflow.jobs import LOCAL_PROGRAM, Log, print_log
from habla.runs.parameters import gpu_count
from habla.training.command import TrainStep

# ------------------------------------------------------------------------------------------------ local

# Variables of an enclosing distributed job that would confuse the torchrun started here.
_DIST_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_commands(
    nproc_per_node: int,
    nnodes: int = 1,
    program: Sequence[str] = LOCAL_PROGRAM,
    train_args: Sequence[str] = (),
    port: int | None = None,
) -> list[list[str]]:
    """The torchrun command line(s) run_local starts: one, or one per simulated node on loopback."""
    base = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        return [[*base, "--standalone", "--nnodes=1", f"--nproc-per-node={nproc_per_node}", *program, *train_args]]
    port = port or _free_port()
    return [
        [
            *base,
            f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc_per_node}",
            f"--node-rank={rank}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            *program,
            *train_args,
        ]
        for rank in range(nnodes)
    ]


def run_local(
    train_args: Sequence[str],
    *,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    program: Sequence[str] = LOCAL_PROGRAM,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    log: Log = print_log,
) -> None:
    """Run ``habla train <train_args>`` under torchrun on this machine and stream its output to ``log``.

    ``nnodes > 1`` starts one torchrun per node on the loopback interface (static rendezvous), the way a
    cluster runs them; each line is prefixed with its node. On CPU, torch.distributed uses gloo. ``program``
    replaces ``-m habla.cli train`` (tests use a small script). Raises HablaError on a non-zero exit or timeout.
    """
    for what, value in (("nproc_per_node", nproc_per_node), ("nnodes", nnodes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HablaError(f"{what} must be an integer >= 1, got {value!r}")
    if importlib.util.find_spec("torch") is None:
        raise HablaError("training here needs torch: pip install 'habla[train]'")
    child_env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS and not k.startswith("PET_")}
    child_env.update(env or {})
    child_env["PYTHONUNBUFFERED"] = "1"
    commands = torchrun_commands(nproc_per_node, nnodes, program, list(train_args))
    bad_input: list[str] = []  # `habla train`'s one-line errors on bad input (it exits 2; torchrun exits 1)
    shown = log

    def log(line: str) -> None:
        match = _BAD_INPUT_LINE.search(line)
        if match:
            bad_input.append(match[1])
        shown(line)

    log(f"torchrun: {nnodes} node(s) x {nproc_per_node} process(es) on this machine")
    procs: list[subprocess.Popen[str]] = []
    readers: list[threading.Thread] = []
    try:
        for rank, command in enumerate(commands):
            proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                env=child_env,
                start_new_session=True,  # its own process group: stop all its workers at once
            )
            procs.append(proc)
            prefix = f"[node {rank}] " if nnodes > 1 else ""
            reader = threading.Thread(target=_pump, args=(proc, prefix, log), daemon=True)
            reader.start()
            readers.append(reader)
        failed = _wait_all(procs, timeout_s)
    except BaseException:
        _stop(procs)
        raise
    finally:
        for reader in readers:
            reader.join(timeout=5)
    if failed == "timeout":
        raise HablaError(f"training under torchrun did not finish within {timeout_s:.0f} s")
    if failed is not None and bad_input:  # bad input: the same again would fail the same way
        raise HablaError(bad_input[0])
    if failed is not None:  # a crash, a lost worker, a fault: what retries are for
        raise Fault(f"training under torchrun failed (exit code {failed}); its output is above")


_BAD_INPUT_LINE = re.compile(r"habla train: error: (.*)$")


def train_here(step: TrainStep, nodes: int, gpus_per_node: str) -> tuple[str, dict[str, float]]:
    """The pipeline's training step in its own pod: torchrun with one process per GPU (or per simulated node on
    a CPU). Returns the model's URI and the training numbers."""
    run_local(step.arguments(), nproc_per_node=max(gpu_count(gpus_per_node), 1), nnodes=nodes)
    return step.result()


def _pump(proc: subprocess.Popen[str], prefix: str, log: Log) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        log(prefix + line.rstrip("\n"))


def _wait_all(procs: list[subprocess.Popen[str]], timeout_s: float | None) -> int | str | None:
    """Wait for every process; on the first failure stop the rest. The failing exit code, 'timeout' or None."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in procs]
        bad = [c for c in codes if c not in (None, 0)]
        if bad:
            _stop(procs)
            return bad[0]
        if all(c == 0 for c in codes):
            return None
        if deadline is not None and time.monotonic() > deadline:
            _stop(procs)
            return "timeout"
        time.sleep(0.1)


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    """SIGTERM each torchrun's process group (torchrun forwards it to its workers), then SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
