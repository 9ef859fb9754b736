"""habla.kubeflow.torchrun: torchrun on this machine, one node or several on loopback (real processes, gloo)."""

from __future__ import annotations

import textwrap

import pytest

from habla.core.errors import Fault, HablaError
from habla.kubeflow import torchrun

# ------------------------------------------------------------------------------------------- torchrun

WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    print(f"rank {dist.get_rank()}/{dist.get_world_size()} sum {int(total.item())} args {sys.argv[1:]}", flush=True)
    dist.destroy_process_group()
    if os.environ.get("FAIL_RANK") == os.environ["RANK"]:
        sys.exit(3)
    if os.environ.get("BAD_INPUT_RANK") == os.environ["RANK"]:
        print("habla train: error: config key model.nope does not exist", file=sys.stderr, flush=True)
        sys.exit(2)
    """
)


def test_torchrun_commands():
    (single,) = torchrun.torchrun_commands(2, train_args=["--x"])
    assert single[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc-per-node=2",
        "-m",
        "habla.cli",
        "train",
        "--x",
    ]
    nodes = torchrun.torchrun_commands(1, nnodes=2, port=29511)
    assert [c[5] for c in nodes] == ["--node-rank=0", "--node-rank=1"]
    assert all("--master-addr=127.0.0.1" in c and "--master-port=29511" in c for c in nodes)


def test_run_local_two_nodes_on_loopback(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    lines: list[str] = []
    torchrun.run_local(
        ["--epochs", "1"], nnodes=2, nproc_per_node=1, program=[str(script)], log=lines.append, timeout_s=120
    )
    text = "\n".join(lines)
    assert "[node 0] rank 0/2 sum 3 args ['--epochs', '1']" in text
    assert "[node 1] rank 1/2 sum 3 args ['--epochs', '1']" in text


def test_a_crashed_worker_is_a_fault_to_retry(tmp_path):
    """torchrun exits 1 whatever its worker's code: a crash is a fault (the pipeline retries the step)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    lines: list[str] = []
    with pytest.raises(Fault, match="failed"):
        torchrun.run_local(
            [],
            nproc_per_node=2,
            program=[str(script)],
            env={"FAIL_RANK": "1"},
            log=lines.append,
            timeout_s=120,
        )
    assert any("rank 0/2 sum 3" in line for line in lines)


def test_bad_input_of_habla_train_is_a_habla_error_with_its_line(tmp_path):
    """`habla train` refusing its input (its one-line error, exit 2) is bad input: not retried, its line kept."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with pytest.raises(HablaError, match="^config key model.nope does not exist$"):
        torchrun.run_local([], nproc_per_node=2, program=[str(script)], env={"BAD_INPUT_RANK": "0"},
                           log=lambda line: None, timeout_s=120)  # fmt: skip


def test_run_local_bad_input():
    with pytest.raises(HablaError, match="nproc_per_node"):
        torchrun.run_local([], nproc_per_node=0)
