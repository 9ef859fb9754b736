"""How much a run trains, and on what batch: the global-batch contract and the length of the LR schedule.

Light on purpose (no torch, NeMo or Lightning): everything here is decided from the config, the train
manifest and the world size, before the slow imports, and tested as plain functions.

**Global batch.** A config names the global batch its optimizer settings were tuned for (``global_batch``:
utterances per optimizer step) and the batch of one device (``model.train_ds.batch_size``). habla train
keeps the global batch whatever the world size, by accumulating gradients::

    accumulate_grad_batches = max(1, round(global_batch / (world_size × per-device batch)))

The learning rate is not rescaled: when the world is too large for the tuned global batch (accumulation 1
already overshoots it) or the division is not exact, the global batch actually used is logged and written
to train_summary.json, and a warning names the ratio when it is more than 10 % off the tuned one.
``trainer.accumulate_grad_batches`` set in the config (or as an override) wins over the derived value.
With dynamic bucketing (tar shards through Lhotse, below) the per-device batch is a duration; its expected
size in utterances is ``batch_duration / mean padded clip duration``.

**Dynamic bucketing.** Tar shards stream through Lhotse, which groups clips of similar length into buckets
(``use_bucketing``) and fills each batch up to ``batch_duration`` seconds of *padded* audio (clips × the
longest of the batch), so batches carry little padding. habla places the bucket edges
(``bucket_duration_bins``) at quantiles of the train durations, equal clips per bucket (NeMo's default spreads
them evenly between min and max duration, where few Common Voice clips are), and, unless the config sets it,
chooses ``batch_duration`` so that a batch holds ``batch_size`` utterances on average, as on the WAV path, so
the LR tuning holds. It starts from ``batch_size × mean padded clip duration`` (each clip padded to the
longest of its bucket) and corrects it by running Lhotse's own sampler over the train durations (no audio)
for the batches one loader worker draws in the run: the sampler picks among its ready buckets uniformly, not
by their share of the clips, so the first guess is off (measured: +11 % utterances per batch over 1,000
batches of Common-Voice-like durations; -43 % on the bundled release, whose few long clips make one-clip
batches). A batch never holds more padded audio than ``batch_size`` clips of the longest duration (what the
per-device batch was sized for).

**Budget.** The run trains ``trainer.max_steps`` optimizer steps, or ``trainer.max_epochs`` epochs, whichever
ends first (as Lightning does). habla computes the steps of an epoch from the train manifest (the clips
within ``min_duration``/``max_duration``, the batch, the world size and the accumulation) and sets
``trainer.max_steps`` to the run's budget in steps, which NeMo sizes its LR schedule from: the schedule
always anneals within the run, and NeMo never asks the (length-less) Lhotse stream for its length. An
epoch of a Lhotse stream is defined as one pass worth of batches (``trainer.limit_train_batches``). A warmup
longer than a fifth of the budget is cut to a fifth, so that a short run still anneals.
"""

from __future__ import annotations

import bisect
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
# Calibration of batch_duration (calibrate_batch_duration): clips sampled, batches simulated, corrections
CALIBRATION_CLIPS = 100_000
CALIBRATION_BATCHES = 1_000
CALIBRATION_ROUNDS = 2
CALIBRATION_SEED = 0
MEASURED_TOLERANCE = 0.25  # a measured/planned utterances-per-step ratio further from 1 than this is warned about


@dataclass(frozen=True)
class Budget:
    """What habla train decided for a run; written to train_summary.json under ``batch`` and ``schedule``."""

    world_size: int
    per_device_batch: float  # utterances (expected, with batch_duration)
    batch_duration: float | None  # padded seconds per device batch (Lhotse dynamic bucketing), else None
    num_buckets: int | None  # Lhotse buckets (with batch_duration)
    simulated_per_device_batch: float | None  # utterances per batch in the calibration's last simulated epoch
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
    bucket_duration_bins: tuple[float, ...] | None = None  # upper edges of all buckets but the last

    def as_summary(self) -> dict:
        values = asdict(self)
        values.pop("bucket_duration_bins")
        batch_keys = ("world_size", "per_device_batch", "batch_duration", "num_buckets", "simulated_per_device_batch",
                      "accumulate_grad_batches", "accumulation_from", "global_batch", "tuned_global_batch")  # fmt: skip
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


def bucket_bins(durations: Sequence[float], buckets: int) -> list[float]:
    """Bucket edges at the quantiles of ``durations`` (sorted): about as many clips in every bucket. Lhotse
    puts a clip in the first bucket whose edge is >= its duration; the last bucket is open-ended."""
    n = len(durations)
    edges = {durations[min(n - 1, math.ceil(k * n / buckets) - 1)] for k in range(1, buckets)}
    return sorted(e for e in edges if e < durations[-1])


def mean_padded(durations: Sequence[float], bins: Sequence[float]) -> float:
    """The mean clip duration once each clip is padded to the longest clip of its bucket."""
    longest: dict[int, float] = {}
    for d in durations:
        b = bisect.bisect_left(bins, d)
        longest[b] = max(longest.get(b, 0.0), d)
    return sum(longest[bisect.bisect_left(bins, d)] for d in durations) / len(durations)


def simulated_batch(
    durations: Sequence[float],
    bins: Sequence[float],
    batch_duration: float,
    batches: int,
    buffer_size: int,
    seed: int = CALIBRATION_SEED,
) -> float:
    """Utterances per batch, on average, when Lhotse's bucketing sampler (as NeMo sets it up: ``bins``, this
    buffer, shuffled) draws ``batches`` batches of ``batch_duration`` padded seconds from an endless stream of
    these durations. Lhotse's own sampler on duration-only cuts: no audio is read."""
    import random

    from lhotse import CutSet
    from lhotse.cut import MonoCut
    from lhotse.dataset.sampling.dynamic import DynamicCutSampler
    from lhotse.dataset.sampling.dynamic_bucketing import DynamicBucketingSampler

    sample = random.Random(seed).sample(sorted(durations), min(len(durations), CALIBRATION_CLIPS))
    cuts = CutSet.from_cuts(MonoCut(f"c{i}", 0.0, d, 0) for i, d in enumerate(sample)).repeat()
    common = dict(max_duration=batch_duration, shuffle=True, seed=seed, shuffle_buffer_size=buffer_size)
    sampler = (
        DynamicBucketingSampler(cuts, duration_bins=list(bins), buffer_size=buffer_size, **common)
        if bins
        else DynamicCutSampler(cuts, **common)  # one bucket: NeMo then uses Lhotse's plain duration sampler
    )
    sizes = [len(batch) for batch, _ in zip(sampler, range(max(1, min(batches, CALIBRATION_BATCHES))))]
    return sum(sizes) / len(sizes)


def calibrate_batch_duration(
    durations: Sequence[float], bins: Sequence[float], batch_size: float, batches: int, buffer_size: int
) -> tuple[float, float]:
    """The ``batch_duration`` whose batches average ``batch_size`` utterances over ``batches`` batches (a loader
    worker's share of the run) of Lhotse's sampler, and the average it gives there. Starts from ``batch_size ×
    mean padded clip`` and corrects it in proportion, CALIBRATION_ROUNDS times."""
    batch_duration = batch_size * mean_padded(durations, bins)
    measured = simulated_batch(durations, bins, batch_duration, batches, buffer_size)
    for _ in range(CALIBRATION_ROUNDS):
        batch_duration *= batch_size / measured
        measured = simulated_batch(durations, bins, batch_duration, batches, buffer_size)
    return batch_duration, measured


def num_buckets(configured, clips: int, utterances_per_batch: float) -> int:
    """NeMo's 30 buckets, fewer when the train set cannot fill them (each must fill a few batches)."""
    if configured is not None:
        return int(configured)
    per_bucket = MIN_CLIPS_PER_BUCKET * max(1.0, utterances_per_batch)
    return max(1, min(DEFAULT_NUM_BUCKETS, int(clips // per_bucket)))


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
    bins, buckets, simulated = None, None, None
    if streamed and ds.get("use_bucketing", True) is not False:
        if batch_size is None and batch_duration is None:
            raise HablaError("set model.train_ds.batch_size or model.train_ds.batch_duration")
        if ds.get("bucket_duration_bins") is not None:
            bins = sorted(float(b) for b in ds.bucket_duration_bins)
        else:
            guess = batch_size if batch_size is not None else batch_duration / mean
            bins = bucket_bins(sorted(durations), num_buckets(ds.get("num_buckets"), clips, guess))
        buckets = len(bins) + 1
        padded = mean_padded(durations, bins)
        if batch_duration is None:  # calibrated below, for batch_size utterances per batch
            per_device = batch_size
            batches = math.ceil(clips / (batch_size * world_size))
        else:
            per_device = batch_duration / padded
            batches = math.ceil(clips / (per_device * world_size))
    elif batch_duration is not None:  # duration batches without buckets: padded to the longest clip seen
        per_device = batch_duration / max(durations)
        batches = math.ceil(clips / (per_device * world_size))
    elif batch_size is None:
        raise HablaError("set model.train_ds.batch_size (utterances per device)")
    else:
        per_device = batch_size
        per_rank = math.ceil(clips / world_size)  # Lightning's DistributedSampler pads the ranks evenly
        batches = int(per_rank // batch_size) if ds.get("drop_last") else math.ceil(per_rank / batch_size)
        if batches < 1:
            raise HablaError(
                f"{clips} train clips over {world_size} rank(s) do not fill one batch of {batch_size:g} "
                "(model.train_ds.drop_last is set): lower model.train_ds.batch_size"
            )
    limit = trainer.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        batches = limit if streamed else min(batches, limit)  # Lightning's cap (a stream's epoch length)
    elif isinstance(limit, float) and 0 < limit < 1:  # a stream's epoch becomes that many whole batches
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

    if bins is not None and batch_duration is None:
        # Each loader worker (or the main process) iterates one sampler for the whole run (NeMo keeps its
        # workers, Lhotse its iterator, across epochs): calibrate over that run's batches.
        run_batches = math.ceil(max(1, steps) * accumulate / max(1, int(ds.get("num_workers") or 0)))
        buffer = int(ds.get("bucket_buffer_size") or min(10_000, clips))
        batch_duration, simulated = calibrate_batch_duration(durations, bins, batch_size, run_batches, buffer)
        # never more padded audio than batch_size of the longest clips: what the per-device batch was sized for
        if batch_duration > batch_size * max(durations):
            batch_duration = batch_size * max(durations)
            simulated = simulated_batch(durations, bins, batch_duration, run_batches, buffer)

    sched = cfg.model.get("optim", {}).get("sched") or {}
    warmup = sched.get("warmup_steps")
    if isinstance(warmup, int) and warmup > 0 and steps > 0:
        warmup = min(warmup, math.floor(steps * MAX_WARMUP_FRACTION))
    return Budget(
        world_size=world_size,
        per_device_batch=round(per_device, 3),
        batch_duration=None if batch_duration is None else round(batch_duration, 3),
        num_buckets=buckets,
        simulated_per_device_batch=None if simulated is None else round(simulated, 2),
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
        bucket_duration_bins=None if bins is None else tuple(round(b, 4) for b in bins),
    )


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
                # batch_size would cap the utterances of a batch of short clips below what the duration allows
                ds.batch_size = None
            if budget.bucket_duration_bins == ():  # one bucket: Lhotse's plain duration sampler
                ds.use_bucketing = False
            elif budget.bucket_duration_bins is not None:
                ds.use_bucketing = True
                ds.bucket_duration_bins = list(budget.bucket_duration_bins)
                ds.num_buckets = budget.num_buckets
                if ds.get("concurrent_bucketing") is None:
                    # Lhotse fills the buckets from a thread that is not a daemon and stops only when the cuts
                    # run out, which an endless tar stream never does: the process would never exit (and every
                    # epoch would start one more). Filling inline costs little: loader workers do it.
                    ds.concurrent_bucketing = False


def describe(budget: Budget) -> list[str]:
    """The log lines of the decisions: batch and accumulation, then the schedule."""
    b = budget
    per_device = (
        f"{b.batch_duration:g} s padded (≈ {b.per_device_batch:g} utterances, {b.num_buckets} duration bucket(s))"
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


def measured_batch_warning(budget: Budget, measured: float | None) -> str | None:
    """After training: a warning when the utterances per optimizer step were far from the plan. Lhotse's bucket
    sampler picks among its ready buckets uniformly, so right after each (re)start, as every epoch of a stream is,
    short-clip buckets give more batches than their share: on a train set not much larger than the bucket
    buffer, steps carry more utterances than planned (the summary's measured_global_batch says how many)."""
    if measured is None:
        return None
    ratio = measured / budget.global_batch
    if abs(ratio - 1) <= MEASURED_TOLERANCE:
        return None
    return (
        f"the optimizer steps averaged {measured:.1f} utterances, {ratio:.2f}× the planned global batch "
        f"{budget.global_batch:g}"
        + (" (Lhotse's bucket sampler favours short-clip buckets after every epoch's restart; a larger train set "
           "or fixed batches, model.train_ds.use_bucketing=false, keep closer to it)" if budget.batch_duration else "")
    )  # fmt: skip


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
