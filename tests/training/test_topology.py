"""habla.training.topology: nodes, devices and ranks from torchrun, Trainer v2 (PET_*) and PyTorchJob variables.

The real multi-process run (two torchrun "nodes", gloo on loopback) is in test_train_distributed.py.
"""

from __future__ import annotations

import pytest

from habla.core.errors import HablaError
from habla.training import topology as distributed


def test_no_launcher_is_one_process():
    t = distributed.detect({})
    assert (t.world_size, t.rank, t.nodes, t.devices, t.launcher) == (1, 0, 1, 1, "single")
    assert not t.is_distributed and t.is_rank_zero


def test_torchrun_two_nodes_of_four_processes():
    env = {
        "TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400",
        # what a TrainJob also injects: torchrun already consumed it
        "PET_NNODES": "2", "PET_NPROC_PER_NODE": "4", "PET_NODE_RANK": "1",
    }  # fmt: skip
    t = distributed.detect(env)
    assert (t.world_size, t.rank, t.local_rank, t.node_rank, t.nodes, t.devices) == (8, 5, 1, 1, 2, 4)
    assert t.launcher == "torchrun" and not t.one_process_per_node
    assert "rank 5/8 (node 1/2, 4 processes per node, torchrun)" == distributed.describe(t)


def test_torchrun_inside_a_pytorchjob_wins_over_the_pod_variables():
    # torchrun overwrites RANK/WORLD_SIZE for its children; the pod's view is gone by then
    env = {"TORCHELASTIC_RUN_ID": "j", "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "1", "MASTER_ADDR": "job-master-0"}  # fmt: skip
    t = distributed.detect(env)
    assert (t.nodes, t.devices, t.node_rank, t.launcher) == (2, 1, 1, "torchrun")


def test_trainjob_pet_variables_without_torchrun_one_process_per_node():
    env = {"PET_NNODES": "3", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "2",
           "PET_MASTER_ADDR": "trainjob-node-0-0.trainjob", "PET_MASTER_PORT": "29400"}  # fmt: skip
    t = distributed.detect(env)
    assert (t.world_size, t.rank, t.node_rank, t.nodes, t.devices, t.launcher) == (3, 2, 2, 3, 1, "trainjob")
    exported: dict[str, str] = {}
    distributed.export_for_lightning(t, exported)
    assert exported == {"MASTER_ADDR": "trainjob-node-0-0.trainjob", "MASTER_PORT": "29400", "WORLD_SIZE": "3",
                        "RANK": "2", "NODE_RANK": "2", "LOCAL_RANK": "0"}  # fmt: skip


def test_trainjob_with_several_processes_per_node_needs_torchrun():
    with pytest.raises(HablaError, match="torchrun --no-python habla train"):
        distributed.detect({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "0"})


def test_pytorchjob_one_process_per_pod():
    env = {"MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "4", "RANK": "3",
           "KUBERNETES_PORT": "tcp://10.0.0.1:443"}  # fmt: skip
    t = distributed.detect(env)
    assert (t.world_size, t.rank, t.node_rank, t.nodes, t.devices, t.launcher) == (4, 3, 3, 4, 1, "pytorchjob")
    assert t.one_process_per_node and not t.is_rank_zero
    exported = dict(env)
    distributed.export_for_lightning(t, exported)
    assert exported["NODE_RANK"] == "3" and exported["LOCAL_RANK"] == "0"


def test_export_does_nothing_under_torchrun():
    env = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "0"}  # fmt: skip
    copy = dict(env)
    distributed.export_for_lightning(distributed.detect(env), copy)
    assert copy == env


@pytest.mark.parametrize(
    "env, message",
    [
        ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "6", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4",
          "GROUP_RANK": "0"}, "same number of processes"),
        ({"MASTER_ADDR": "m", "WORLD_SIZE": "2", "RANK": "2"}, "outside world size"),
        ({"MASTER_ADDR": "m", "WORLD_SIZE": "two", "RANK": "0"}, "not an integer"),
        ({"PET_NNODES": "1:4", "PET_NODE_RANK": "0"}, "elastic"),
        ({"MASTER_ADDR": "m", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "1"}, "need torchrun"),
    ],
)  # fmt: skip
def test_incoherent_environments_are_one_line_errors(env, message):
    with pytest.raises(HablaError, match=message):
        distributed.detect(env)
