"""How much a run trains, and on what batch: the global-batch contract and the length of the LR schedule.

Light on purpose (no torch, NeMo or Lightning): everything here is decided from the config, the train
manifest and the world size, before the slow imports, and tested as plain functions.

**Global batch.** A config names the global batch its optimizer settings were tuned for (``global_batch``:
utterances per optimizer step) and the batch of one device (``model.train_ds.batch_size``). habla train
keeps the global batch whatever the world size, by accumulating gradients::

    accumulate_grad_batches = max(1, round(global_batch / (world_size × per-device batch)))

The learning rate is not rescaled: when the world is too large for the tuned global batch (accumulation 1
already overshoots it) or the division is not exact, the global batch actually used is logged, written to
train_summary.json, and a warning names the ratio. ``trainer.accumulate_grad_batches`` set in the config (or
as an override) wins over the derived value. With dynamic bucketing (tar shards through Lhotse, below) the
per-device batch is a duration; its expected size in utterances is ``batch_duration / mean clip duration``.

**Dynamic bucketing.** Tar shards stream through Lhotse, which batches by total duration: clips of similar
length are grouped (``use_bucketing``, ``num_buckets`` buckets), so batches carry little padding. Unless the
config sets it, ``batch_duration`` (seconds per device batch) is ``batch_size × mean train clip duration``:
the same number of utterances per step on average as the WAV path, so the LR tuning holds, and never more
audio in a batch than ``batch_size`` clips of the longest duration (what the per-device batch was sized for).

**Budget.** The run trains ``trainer.max_steps`` optimizer steps, or ``trainer.max_epochs`` epochs, whichever
ends first (as Lightning does). habla computes the steps of an epoch from the train manifest (the clips
within ``min_duration``/``max_duration``, the batch, the world size and the accumulation) and sets
``trainer.max_steps`` to the run's budget in steps, which NeMo sizes its LR schedule from: the schedule
always anneals within the run, and NeMo never asks the (length-less) Lhotse stream for its length. An
epoch of a Lhotse stream is defined as one pass worth of batches (``trainer.limit_train_batches``). A warmup
longer than a fifth of the budget is cut to a fifth, so that a short run still anneals.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from habla.core.errors import HablaError

log = logging.getLogger("habla.train")

MAX_WARMUP_FRACTION = 0.2  # of the run's steps
DEFAULT_NUM_BUCKETS = 30  # NeMo's Lhotse default
MIN_CLIPS_PER_BUCKET = 4  # fewer buckets for a small train set: each must be able to fill batches
GLOBAL_BATCH_TOLERANCE = 0.1  # a used/tuned ratio further from 1 than this is warned about


@dataclass(frozen=True)
class Budget:
    """What habla train decided for a run; written to train_summary.json under ``batch`` and ``schedule``."""

    world_size: int
    per_device_batch: float  # utterances (expected, with batch_duration)
    batch_duration: float | None  # seconds per device batch (Lhotse dynamic bucketing), else None
    accumulate_grad_batches: int
    accumulation_from: str  # "global_batch", "config" or "none" (the config names no global batch)
    global_batch: float  # utterances per optimizer step actually used
    tuned_global_batch: float  # what the config's optimizer settings were tuned for
    train_clips: int  # within min/max_duration
    train_hours: float
    batches_per_epoch: int  # per rank
    steps_per_epoch: int  # optimizer steps
    max_steps: int  # the run's budget
    budget_from: str  # "max_steps" or "max_epochs"
    epochs: float  # the budget in epochs
    warmup_steps: int | None

    def as_summary(self) -> dict:
        values = asdict(self)
        batch_keys = ("world_size", "per_device_batch", "batch_duration", "accumulate_grad_batches",
                      "accumulation_from", "global_batch", "tuned_global_batch")  # fmt: skip
        return {
            "batch": {k: values[k] for k in batch_keys},
            "schedule": {k: v for k, v in values.items() if k not in batch_keys},
        }


def _positive(value, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise HablaError(f"{what} must be a positive number (got {value!r})")
    return float(value)


def _limit(value, default: float) -> float:
    return default if value is None or value < 0 else float(value)


def kept_durations(entries: Sequence[dict], ds) -> list[float]:
    """Durations of the train clips NeMo will keep (its loaders drop those outside min/max_duration)."""
    low = _limit(ds.get("min_duration"), 0.0)
    high = _limit(ds.get("max_duration"), math.inf)
    return [float(e["duration"]) for e in entries if low <= float(e["duration"]) <= high]


def plan(cfg, entries: Sequence[dict], world_size: int, streamed: bool) -> Budget:
    """Decide batch, accumulation and budget for ``cfg`` on these train entries. ``streamed``: Lhotse (tars)."""
    ds, trainer = cfg.model.train_ds, cfg.trainer
    durations = kept_durations(entries, ds)
    if not durations:
        raise HablaError(
            f"none of the {len(entries)} train clips is within model.train_ds.min_duration/max_duration "
            f"({ds.get('min_duration')}, {ds.get('max_duration')})"
        )
    clips, seconds = len(durations), sum(durations)
    mean = seconds / clips

    batch_size = _positive(ds.get("batch_size"), "model.train_ds.batch_size")
    batch_duration = _positive(ds.get("batch_duration"), "model.train_ds.batch_duration") if streamed else None
    if streamed and ds.get("use_bucketing", True) is not False and batch_duration is None:
        if batch_size is None:
            raise HablaError("set model.train_ds.batch_size or model.train_ds.batch_duration")
        batch_duration = batch_size * mean
    if batch_duration is not None:
        per_device = batch_duration / mean
        batches = math.ceil(seconds / (batch_duration * world_size))
    elif batch_size is None:
        raise HablaError("set model.train_ds.batch_size (utterances per device)")
    else:
        per_device = batch_size
        per_rank = math.ceil(clips / world_size)  # Lightning's DistributedSampler pads the ranks evenly
        batches = per_rank // batch_size if ds.get("drop_last") else math.ceil(per_rank / batch_size)
        if batches < 1:
            raise HablaError(
                f"{clips} train clips over {world_size} rank(s) do not fill one batch of {batch_size:g} "
                "(model.train_ds.drop_last is set): lower model.train_ds.batch_size"
            )
    limit = trainer.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        batches = limit if streamed else min(batches, limit)  # Lightning's cap (a stream's epoch length)
    elif isinstance(limit, float) and 0 < limit < 1 and not streamed:
        batches = max(1, int(batches * limit))

    tuned = _positive(cfg.get("global_batch"), "global_batch")
    configured = trainer.get("accumulate_grad_batches")
    if configured is not None:
        if isinstance(configured, bool) or not isinstance(configured, int) or configured < 1:
            raise HablaError(f"trainer.accumulate_grad_batches must be an integer >= 1 (got {configured!r})")
        accumulate, source = configured, "config"
    elif tuned is None:
        accumulate, source = 1, "none"
    else:
        accumulate, source = max(1, round(tuned / (per_device * world_size))), "global_batch"
    used = per_device * world_size * accumulate
    steps_per_epoch = math.ceil(batches / accumulate)

    max_steps, epochs = trainer.get("max_steps"), trainer.get("max_epochs")
    budgets = {}
    if isinstance(max_steps, int) and max_steps >= 0:
        budgets["max_steps"] = max_steps
    if isinstance(epochs, int) and epochs >= 0:
        budgets["max_epochs"] = epochs * steps_per_epoch
    if not budgets:
        raise HablaError(
            "cannot size the LR schedule: set trainer.max_steps (optimizer steps) or trainer.max_epochs to a "
            f"whole number >= 0 (got max_steps={max_steps!r}, max_epochs={epochs!r})"
        )
    budget_from = min(budgets, key=lambda k: (budgets[k], k != "max_steps"))
    steps = budgets[budget_from]

    sched = cfg.model.get("optim", {}).get("sched") or {}
    warmup = sched.get("warmup_steps")
    if isinstance(warmup, int) and warmup > 0 and steps > 0:
        warmup = min(warmup, math.floor(steps * MAX_WARMUP_FRACTION))
    return Budget(
        world_size=world_size,
        per_device_batch=round(per_device, 3),
        batch_duration=None if batch_duration is None else round(batch_duration, 3),
        accumulate_grad_batches=accumulate,
        accumulation_from=source,
        global_batch=round(used, 3),
        tuned_global_batch=round(tuned if tuned is not None else per_device * world_size, 3),
        train_clips=clips,
        train_hours=round(seconds / 3600, 4),
        batches_per_epoch=batches,
        steps_per_epoch=steps_per_epoch,
        max_steps=steps,
        budget_from=budget_from,
        epochs=round(steps / steps_per_epoch, 3),
        warmup_steps=warmup if isinstance(warmup, int) else None,
    )


def num_buckets(cfg, clips: int, budget: Budget) -> int:
    """NeMo's 30 buckets, fewer when the train set cannot fill them (each bucket must fill a few batches)."""
    configured = cfg.model.train_ds.get("num_buckets")
    if configured is not None:
        return int(configured)
    per_bucket = MIN_CLIPS_PER_BUCKET * max(1.0, budget.per_device_batch)
    return max(1, min(DEFAULT_NUM_BUCKETS, int(clips // per_bucket)))


def apply(cfg, budget: Budget, streamed: bool) -> None:
    """Write the decisions into the config NeMo and Lightning receive (and config.yaml records)."""
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.trainer.max_steps = budget.max_steps
        cfg.trainer.accumulate_grad_batches = budget.accumulate_grad_batches
        sched = cfg.model.optim.get("sched")
        if sched is not None and budget.warmup_steps is not None:
            sched.warmup_steps = budget.warmup_steps
        if streamed:
            ds = cfg.model.train_ds
            if not isinstance(cfg.trainer.get("limit_train_batches"), int):
                # A Lhotse stream of tar shards repeats forever: an epoch is one pass worth of batches per rank.
                cfg.trainer.limit_train_batches = budget.batches_per_epoch
            if budget.batch_duration is not None:
                ds.batch_duration = budget.batch_duration
                ds.use_bucketing = True
                ds.num_buckets = num_buckets(cfg, budget.train_clips, budget)
                # batch_size would cap the utterances of a batch of short clips below what the duration allows
                ds.batch_size = None
                if ds.get("concurrent_bucketing") is None:
                    # Lhotse fills the buckets from a thread that is not a daemon and stops only when the cuts
                    # run out, which an endless tar stream never does: the process would never exit (and every
                    # epoch would start one more). Filling inline costs little: loader workers do it.
                    ds.concurrent_bucketing = False


def describe(budget: Budget) -> list[str]:
    """The log lines of the decisions: batch and accumulation, then the schedule."""
    b = budget
    per_device = (
        f"{b.batch_duration:g} s (≈ {b.per_device_batch:g} utterances, dynamic bucketing)"
        if b.batch_duration is not None
        else f"{b.per_device_batch:g} utterances"
    )
    why = {"global_batch": f"for the config's global_batch {b.tuned_global_batch:g}",
           "config": "set by trainer.accumulate_grad_batches",
           "none": "the config names no global_batch"}[b.accumulation_from]  # fmt: skip
    lines = [
        f"batch: {per_device} per device × {b.world_size} device{'s' if b.world_size > 1 else ''} × "
        f"accumulate {b.accumulate_grad_batches} ({why}) = global batch {b.global_batch:g}",
        f"schedule: {b.max_steps} optimizer steps (from trainer.{b.budget_from}) = {b.epochs:g} epoch(s) of "
        f"{b.steps_per_epoch} steps over {b.train_clips} clips ({b.train_hours:.2f} h); warmup "
        f"{b.warmup_steps if b.warmup_steps is not None else 'none'}; the LR schedule ends at step {b.max_steps}",
    ]
    return lines


def global_batch_warning(budget: Budget) -> str | None:
    """A warning when the global batch used is not the one the optimizer settings were tuned for."""
    b = budget
    if b.accumulation_from == "none":
        return None
    ratio = b.global_batch / b.tuned_global_batch
    if abs(ratio - 1) <= GLOBAL_BATCH_TOLERANCE:
        return None
    return (
        f"global batch {b.global_batch:g} is {ratio:.2f}× the {b.tuned_global_batch:g} the config's learning rate "
        "was tuned for (world size × per-device batch × accumulation); the LR is not rescaled: adjust "
        "model.train_ds.batch_size or model.optim.lr if this is not what you want"
    )
