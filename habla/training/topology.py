"""Where this process sits in a distributed training job, read from the launcher's environment variables.

Three launchers run the unchanged ``habla train`` (one process per device):

- **torchrun** (also inside a Kubeflow Trainer v2 ``TrainJob``, whose command is torchrun and whose
  ``PET_*`` variables are torchrun's flags): every process gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` and ``TORCHELASTIC_RUN_ID``. Lightning detects torchrun itself.
- **``PET_*`` without torchrun** (a TrainJob whose command is ``habla train``): one process per node is
  supported: ``PET_NODE_RANK`` is the rank and ``PET_NNODES`` the world size. More processes per node need
  torchrun, which this module says in one line.
- **Training Operator ``PyTorchJob``** without torchrun: ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE`` and
  ``RANK`` per pod, one process per pod, so ``RANK`` is also the node rank (Lightning's
  ``KubeflowEnvironment``). A PyTorchJob whose command is torchrun is the torchrun case.

Lightning requires ``devices × num_nodes == WORLD_SIZE``: ``devices`` is the processes per node and
``nodes`` the world size divided by it (every node runs the same number of processes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from habla.core.errors import HablaError

SINGLE = "single"
TORCHRUN = "torchrun"
PET = "trainjob"  # PET_* variables without torchrun
PYTORCHJOB = "pytorchjob"


@dataclass(frozen=True)
class Topology:
    """This process's place in the job. ``devices`` is the number of processes per node."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    node_rank: int = 0
    nodes: int = 1
    devices: int = 1
    launcher: str = SINGLE
    master_addr: str = ""
    master_port: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def one_process_per_node(self) -> bool:
        """True when no torchrun spawned this process, so Lightning must be told the ranks (KubeflowEnvironment)."""
        return self.launcher in (PET, PYTORCHJOB)


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise HablaError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise HablaError(f"environment variable {name}={value!r} is not an integer") from None


def _checked(topology: Topology) -> Topology:
    t = topology
    if t.world_size < 1 or t.devices < 1 or t.nodes < 1:
        raise HablaError(f"{t.launcher}: world size, nodes and processes per node must be >= 1 ({t})")
    if not 0 <= t.rank < t.world_size:
        raise HablaError(f"{t.launcher}: rank {t.rank} is outside world size {t.world_size}")
    if t.nodes * t.devices != t.world_size:
        raise HablaError(
            f"{t.launcher}: world size {t.world_size} is not nodes × processes per node "
            f"({t.nodes} × {t.devices}); every node must run the same number of processes"
        )
    if not 0 <= t.node_rank < t.nodes:
        raise HablaError(f"{t.launcher}: node rank {t.node_rank} is outside {t.nodes} nodes")
    return t


def detect(env: Mapping[str, str] | None = None) -> Topology:
    """Read the topology from ``env`` (default: this process's environment). Raises HablaError when incoherent."""
    env = os.environ if env is None else env

    if "TORCHELASTIC_RUN_ID" in env or ("LOCAL_WORLD_SIZE" in env and "GROUP_RANK" in env):
        world_size = _int(env, "WORLD_SIZE")
        per_node = _int(env, "LOCAL_WORLD_SIZE")
        return _checked(
            Topology(
                world_size=world_size,
                rank=_int(env, "RANK"),
                local_rank=_int(env, "LOCAL_RANK"),
                node_rank=_int(env, "GROUP_RANK", _int(env, "NODE_RANK", 0)),
                nodes=world_size // per_node if per_node else 0,
                devices=per_node,
                launcher=TORCHRUN,
                master_addr=env.get("MASTER_ADDR", ""),
                master_port=_int(env, "MASTER_PORT", 0),
            )
        )

    if "PET_NNODES" in env:
        nodes_text = env["PET_NNODES"]
        if ":" in nodes_text:  # elastic "min:max"
            raise HablaError(f"PET_NNODES={nodes_text!r}: elastic node ranges need torchrun as the TrainJob command")
        per_node = env.get("PET_NPROC_PER_NODE", "1")
        if per_node not in ("1", "auto", ""):
            raise HablaError(
                f"PET_NPROC_PER_NODE={per_node} but habla train was not started by torchrun: "
                "run `torchrun --no-python habla train ...` as the TrainJob command"
            )
        nodes = _int(env, "PET_NNODES")
        node_rank = _int(env, "PET_NODE_RANK", 0)
        return _checked(
            Topology(
                world_size=nodes,
                rank=node_rank,
                node_rank=node_rank,
                nodes=nodes,
                launcher=PET,
                master_addr=env.get("PET_MASTER_ADDR", env.get("MASTER_ADDR", "")),
                master_port=_int(env, "PET_MASTER_PORT", _int(env, "MASTER_PORT", 29500)),
            )
        )

    if "WORLD_SIZE" in env and "RANK" in env and "MASTER_ADDR" in env:
        if "LOCAL_RANK" in env and _int(env, "LOCAL_RANK") != 0:
            raise HablaError("LOCAL_RANK is set without torchrun: several processes per pod need torchrun")
        world_size = _int(env, "WORLD_SIZE")
        rank = _int(env, "RANK")
        return _checked(
            Topology(
                world_size=world_size,
                rank=rank,
                node_rank=rank,
                nodes=world_size,
                launcher=PYTORCHJOB,
                master_addr=env["MASTER_ADDR"],
                master_port=_int(env, "MASTER_PORT", 29500),
            )
        )

    return Topology()


def export_for_lightning(topology: Topology, env: MutableMapping[str, str] | None = None) -> None:
    """Set the variables Lightning's KubeflowEnvironment and NeMo's rank helpers read (one process per node).

    Under torchrun nothing is needed. For ``PET_*`` without torchrun the standard names are derived from
    the ``PET_*`` ones; for a PyTorchJob they are already there.
    """
    env = os.environ if env is None else env
    if not topology.one_process_per_node:
        return
    env["MASTER_ADDR"] = topology.master_addr
    env["MASTER_PORT"] = str(topology.master_port)
    env["WORLD_SIZE"] = str(topology.world_size)
    env["RANK"] = str(topology.rank)
    env["NODE_RANK"] = str(topology.node_rank)
    env.setdefault("LOCAL_RANK", "0")


#: Where the container's memory limit is read: cgroup v2, then v1 (whose "no limit" is a huge number).
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def memory_limit_gib(paths: tuple[str, ...] = CGROUP_MEMORY_LIMITS) -> float | None:
    """This container's memory limit in GiB (its pod's, on Kubernetes), or None when it has none."""
    for path in paths:
        try:
            text = open(path, encoding="ascii").read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text) / 2**30
        return None
    return None


def describe(topology: Topology) -> str:
    """One log line: ``rank 1/2 (node 1/2, 1 process per node, torchrun)``."""
    t = topology
    return (
        f"rank {t.rank}/{t.world_size} (node {t.node_rank}/{t.nodes}, "
        f"{t.devices} process{'es' if t.devices > 1 else ''} per node, {t.launcher})"
    )
