"""Who writes a training run's ``DST``, what it already holds, and where a run's local files live (RunPaths).

* ``DST/claim.json`` (created once, then compared: habla.core.claims.claim) names the model the folder trains:
  its config, the checkpoint it starts from and the ``model.*`` overrides. A ``--resume`` with another model is
  refused; ``trainer.*`` overrides may change (train longer, another precision).
* ``DST/.lease.json`` (habla.core.claims.Lease): one writer at a time. A second ``habla train`` into the same
  DST while the first runs is refused; one killed without a word is taken over once its lease expires (300 s,
  ``HABLA_TRAIN_LEASE_SECONDS``).
* A ``model.nemo`` is never replaced by a run that did not start from its checkpoint: without ``--resume`` a
  folder that holds a run is refused; with ``--resume`` it continues from ``checkpoints/last.ckpt`` (a finished
  run trains on when ``trainer.max_steps`` grew, else ends at once), and a ``model.nemo`` without a checkpoint
  to continue from is refused rather than trained over from step 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from habla.core import claims, storage
from habla.core.errors import HablaError
from habla.core.layout import TrainLayout
from habla.speech import models

log = logging.getLogger("habla.train")

LEASE_ENV = "HABLA_TRAIN_LEASE_SECONDS"  # how long a killed run keeps others out of its DST (default 300 s)


@dataclass(frozen=True)
class RunPaths:
    """Where a run's files live: ``dst`` the user's DST; ``work`` the local folder Lightning writes to (DST
    itself when local); ``scratch`` local files of this run that are not outputs (localised manifests)."""

    dst: TrainLayout
    work: Path
    scratch: Path

    @property
    def remote(self) -> bool:
        return storage.is_s3(self.dst.root)

    @classmethod
    def for_dst(cls, dst: str) -> RunPaths:
        dst = storage.absolute(dst).rstrip("/")
        run_dir = models.cache_root() / "runs" / hashlib.sha1(dst.encode()).hexdigest()[:16]
        work = run_dir / "work" if storage.is_s3(dst) else Path(dst)
        return cls(dst=TrainLayout(dst), work=work, scratch=run_dir)


def identity(config: str, overrides: Sequence[str], init_from: str | None) -> dict:
    """What makes two runs the same model: config, starting checkpoint, and the overrides under ``model.``."""
    model_overrides = sorted(o for o in overrides if o.lstrip("+").startswith("model."))
    return {"config": config, "init_from": init_from or "", "model_overrides": model_overrides}


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Writing:
    """This process's hold on DST while it trains: rank 0's lease (None on the other ranks)."""

    lease: claims.Lease | None

    def check_still_ours(self) -> None:
        """Before publishing: refuse if another writer took the folder over meanwhile."""
        if self.lease is not None and self.lease.lost:
            raise HablaError(f"{self.lease.uri}: another run took this output over; nothing was published")


@contextlib.contextmanager
def writing(dst: TrainLayout, run: dict, resume: bool, rank_zero: bool) -> Iterator[Writing]:
    """Hold DST for this run (see the module doc). Rank 0 takes the lease and binds the folder; the other ranks
    follow it (rank 0 refusing stops them: torchrun ends the group)."""
    if not rank_zero:
        yield Writing(None)
        return
    lease = claims.Lease(dst.lease, dst.root, ttl=float(os.environ.get(LEASE_ENV) or 300)).acquire()
    try:
        bind(dst, run, resume)
        yield Writing(lease)
    finally:
        lease.release()


def bind(dst: TrainLayout, run: dict, resume: bool) -> None:
    """Bind ``dst`` to the model ``run`` (:func:`identity`), under the lease. HablaError for a folder that holds
    another model, or a model.nemo that this run would train over from step 0."""
    if resume and storage.exists(dst.model) and not storage.exists(dst.last_checkpoint):
        raise HablaError(
            f"{dst.root} holds a model.nemo but no checkpoint to continue it from: --resume would train over it "
            "from step 0; choose another --out (or --init-from that model)"
        )
    record = {**run, "by": owner(), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    held = claims.claim(dst.claim, record, tuple(run), remedy="choose another --out")
    if not held.mine:
        theirs = {k: held.holder.get(k) for k in run}
        raise HablaError(f"{dst.root} trains another model ({_shown(theirs)}, not {_shown(run)}): choose another --out")


def _shown(run: dict) -> str:
    parts = [f"config {run['config']}"] + ([f"from {run['init_from']}"] if run.get("init_from") else [])
    return ", ".join(parts + list(run.get("model_overrides") or []))
