"""How much a run trains, on what batch, how often it validates, and what a node must request: the run's plan.

Light on purpose (no torch, NeMo or Lightning): everything here is decided from the config, the train
manifest and the world size, before the slow imports, and tested as plain functions. ``habla train --dry-run``
prints it; the launchers size the nodes' requests from it.

**Global batch.** A config names the global batch its optimizer settings were tuned for (``global_batch``:
utterances per optimizer step) and what one device can hold (``model.train_ds.batch_size`` utterances, or on
tar shards ``batch_size × max_duration`` seconds of padded audio, or what a GPU was measured to hold). habla
train keeps the global batch within 10 % whatever the world size: it accumulates gradients while one
step of every device holds less than the global batch, and shrinks the per-device batch when it holds more::

    accumulate_grad_batches = ceil(global_batch / (world_size × what a device holds))
    per-device batch        = global_batch / (world_size × accumulate_grad_batches)

so 8 nodes × 8 GPUs train on the tuned global batch with smaller per-device batches, and finish sooner. Where
it cannot hold (more devices than the global batch has utterances), the plan refuses in one line, unless the
config's ``scale_lr`` (``linear`` or ``sqrt``) asks for the learning rate to follow the global batch; the
factor is in the plan and in train_summary.json. ``trainer.accumulate_grad_batches`` set in the config wins
over the derived value (the per-device batch is then what the device holds; a global batch far from the
tuned one is warned about).

**Dynamic bucketing**: habla.training.bucketing (bucket edges at quantiles of the train durations,
``batch_duration`` calibrated on Lhotse's own sampler).

**Budget.** The run trains ``trainer.max_steps`` optimizer steps, or ``trainer.max_epochs`` epochs, whichever
ends first (as Lightning does). ``max_steps`` counts steps of the tuned global batch: when the global batch
used differs, the steps follow so that the run makes the same passes over the data (the warmup and the
validation cadence follow too). habla computes the steps of an epoch from the train manifest (the clips
within ``min_duration``/``max_duration``, the batch, the world size and the accumulation) and sets
``trainer.max_steps`` to the run's budget in steps, which NeMo sizes its LR schedule from: the schedule
always anneals within the run, and NeMo never asks the (length-less) Lhotse stream for its length. An
epoch of a Lhotse stream is defined as one pass worth of batches (``trainer.limit_train_batches``). A warmup
longer than a fifth of the budget is cut to a fifth, so that a short run still anneals.

**Cadence.** The config's ``validate_every_steps`` (optimizer steps; null: once per epoch) becomes Lightning's
``val_check_interval`` in batches (× the accumulation, counted across epochs), so validation never runs more
often than the config intends at any world size; checkpoints are written after each validation (or every
``checkpoint.every_n_train_steps``).

**Loader memory and node requests**: habla.training.loader.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from habla.core.errors import HablaError
from habla.training import loader
from habla.training.bucketing import bucket_bins, calibrate_batch_duration, mean_padded, num_buckets, simulated_batch

log = logging.getLogger("habla.train")

MAX_WARMUP_FRACTION = 0.2  # of the run's steps
GLOBAL_BATCH_TOLERANCE = 0.1  # the global batch used stays this close to the tuned one (or the plan refuses)
SCALE_RULES = ("linear", "sqrt")  # scale_lr: the LR × used/tuned global batch, or × its square root
MEASURED_TOLERANCE = 0.25  # a measured/planned utterances-per-step ratio further from 1 than this is warned about


@dataclass(frozen=True)
class Budget:
    """The run's plan; written to train_summary.json and printed by ``habla train --dry-run``."""

    world_size: int
    per_device_batch: float  # utterances (expected, with batch_duration)
    batch_duration: float | None  # padded seconds per device batch (Lhotse dynamic bucketing), else None
    device_capacity: float  # what one device holds: utterances, or padded seconds with batch_duration
    capacity_from: str  # "config" (batch_size, max_duration, batch_duration) or "gpu" (measured)
    num_buckets: int | None  # Lhotse buckets (with batch_duration)
    simulated_per_device_batch: float | None  # utterances per batch in the calibration's last simulated epoch
    accumulate_grad_batches: int
    accumulation_from: str  # "global_batch", "config" or "none" (the config names no global batch)
    global_batch: float  # utterances per optimizer step actually used
    tuned_global_batch: float  # what the config's optimizer settings were tuned for
    lr: float | None  # what the optimizer uses
    tuned_lr: float | None  # the config's
    lr_scale: float  # lr / tuned_lr
    lr_rule: str | None  # scale_lr: "linear", "sqrt", or None (not scaled)
    train_clips: int  # within min/max_duration
    train_hours: float
    batches_per_epoch: int  # per rank
    steps_per_epoch: int  # optimizer steps
    max_steps: int  # the run's budget
    budget_from: str  # "max_steps" or "max_epochs"
    epochs: float  # the budget in epochs
    warmup_steps: int | None
    validate_every_steps: int
    checkpoint_every_steps: int
    loader: loader.Loader
    node: loader.NodeRequest
    bucket_duration_bins: tuple[float, ...] | None = None  # upper edges of all buckets but the last

    def as_summary(self) -> dict:
        """The plan in sections: batch, learning_rate, schedule, cadence, loader, node."""
        values = asdict(self)
        sections = {
            "batch": ("world_size", "per_device_batch", "batch_duration", "device_capacity", "capacity_from",
                      "num_buckets", "simulated_per_device_batch", "accumulate_grad_batches", "accumulation_from",
                      "global_batch", "tuned_global_batch"),
            "learning_rate": ("lr", "tuned_lr", "lr_scale", "lr_rule", "warmup_steps"),
            "schedule": ("train_clips", "train_hours", "batches_per_epoch", "steps_per_epoch", "max_steps",
                         "budget_from", "epochs"),
            "cadence": ("validate_every_steps", "checkpoint_every_steps"),
        }  # fmt: skip
        summary = {name: {k: values[k] for k in keys} for name, keys in sections.items()}
        summary["cadence"]["validations"] = self.max_steps // self.validate_every_steps if self.max_steps else 0
        summary["loader"] = values["loader"]
        summary["node"] = {**values["node"], "memory": self.node.memory}
        return summary


def _positive(value, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or not math.isfinite(value):
        raise HablaError(f"{what} must be a positive number (got {value!r})")
    return float(value)


def _limit(value, default: float) -> float:
    return default if value is None or value < 0 else float(value)


def kept_durations(entries: Sequence[dict], ds) -> list[float]:
    """Durations of the train clips NeMo will keep (its loaders drop those outside min/max_duration)."""
    low = _limit(ds.get("min_duration"), 0.0)
    high = _limit(ds.get("max_duration"), math.inf)
    return [float(e["duration"]) for e in entries if low <= float(e["duration"]) <= high]


def _whole(value, what: str, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise HablaError(f"{what} must be a whole number >= {minimum} (got {value!r})")
    return value


def _resource(cfg, key: str, default: float) -> float:
    value = (cfg.get("resources") or {}).get(key)
    return default if value is None else _positive(value, f"resources.{key}")


def _per_device(capacity: float, world_size: int, tuned: float | None, configured: int | None, whole: bool):
    """Accumulation, per-device batch (utterances) and where the accumulation came from (module docstring).

    The fewest accumulated batches whose per-device batch (at most ``capacity``; whole utterances with
    ``whole``) puts the global batch within GLOBAL_BATCH_TOLERANCE of ``tuned``; when none does, the
    closest."""
    if configured is not None:
        return configured, capacity, "config"
    if tuned is None:
        return 1, capacity, "none"
    first = max(1, math.ceil(tuned / (world_size * capacity) - 1e-9))
    best = None
    for accumulate in range(first, max(first, int(tuned * (1 + GLOBAL_BATCH_TOLERANCE) / world_size)) + 1):
        target = tuned / (world_size * accumulate)
        per_device = min(capacity, max(1.0, round(target) if whole else target))
        miss = abs(per_device * world_size * accumulate / tuned - 1)
        if best is None or miss < best[0]:
            best = (miss, accumulate, per_device)
        if miss <= GLOBAL_BATCH_TOLERANCE:
            break
    return best[1], best[2], "global_batch"


def _scaled(value: int | None, scale: float) -> int | None:
    return None if value is None else max(1, round(value * scale))


def plan(
    cfg,
    entries: Sequence[dict],
    world_size: int,
    streamed: bool,
    *,
    devices_per_node: int = 1,
    measured_capacity: float | None = None,
) -> Budget:
    """Decide the run's plan for ``cfg`` on these train entries. ``streamed``: Lhotse (tar shards).
    ``devices_per_node``: training processes per node (the node request). ``measured_capacity``: the padded
    seconds a device was measured to hold (habla.training.sizing), instead of the config's."""
    ds, trainer = cfg.model.train_ds, cfg.trainer
    durations = kept_durations(entries, ds)
    if not durations:
        raise HablaError(
            f"none of the {len(entries)} train clips is within model.train_ds.min_duration/max_duration "
            f"({ds.get('min_duration')}, {ds.get('max_duration')})"
        )
    clips, seconds, longest = len(durations), sum(durations), max(durations)
    mean = seconds / clips

    batch_size = _positive(ds.get("batch_size"), "model.train_ds.batch_size")
    batch_duration = _positive(ds.get("batch_duration"), "model.train_ds.batch_duration") if streamed else None
    tuned = _positive(cfg.get("global_batch"), "global_batch")
    configured = _whole(trainer.get("accumulate_grad_batches"), "trainer.accumulate_grad_batches", 1)
    rule = cfg.get("scale_lr")
    if rule is not None and rule not in SCALE_RULES:
        raise HablaError(f"scale_lr must be null, {' or '.join(SCALE_RULES)} (got {rule!r})")

    # 1. What one device holds: utterances (fixed batches) or padded seconds (duration batches on tar shards).
    bucketed = streamed and ds.get("use_bucketing", True) is not False
    by_duration = bucketed or batch_duration is not None
    bins = None
    if by_duration:
        if batch_size is None and batch_duration is None:
            raise HablaError("set model.train_ds.batch_size or model.train_ds.batch_duration")
        capacity = measured_capacity or batch_duration or batch_size * longest
        if bucketed:
            if ds.get("bucket_duration_bins") is not None:
                bins = sorted(float(b) for b in ds.bucket_duration_bins)
            else:
                expected = min(capacity / mean, tuned / world_size) if tuned else capacity / mean
                bins = bucket_bins(sorted(durations), num_buckets(ds.get("num_buckets"), clips, expected))
        padded = mean_padded(durations, bins) if bins else longest
        capacity_utterances = capacity / padded
    elif batch_size is None:
        raise HablaError("set model.train_ds.batch_size (utterances per device)")
    else:
        capacity = capacity_utterances = batch_size
    capacity_from = "gpu" if measured_capacity and by_duration else "config"

    # 2. Accumulation and per-device batch for the tuned global batch.
    accumulate, per_device, source = _per_device(capacity_utterances, world_size, tuned, configured, not by_duration)
    used = per_device * world_size * accumulate
    ratio = used / tuned if tuned else 1.0
    if source == "global_batch" and abs(ratio - 1) > GLOBAL_BATCH_TOLERANCE and rule is None:
        raise HablaError(
            f"{world_size} devices cannot train on global_batch {tuned:g} within {GLOBAL_BATCH_TOLERANCE:.0%} (the "
            f"closest is {used:g} utterances per step): use another number of devices, or set scale_lr=linear or "
            "scale_lr=sqrt to scale the learning rate with the global batch"
        )
    lr_scale = 1.0
    if rule is not None and source != "none":
        lr_scale = ratio if rule == "linear" else math.sqrt(ratio)
    tuned_lr = cfg.model.get("optim", {}).get("lr")
    tuned_lr = float(tuned_lr) if isinstance(tuned_lr, (int, float)) and not isinstance(tuned_lr, bool) else None

    # 3. Batches per epoch (per rank) and optimizer steps.
    if by_duration:
        batches = math.ceil(clips / (per_device * world_size))
    else:
        per_rank = math.ceil(clips / world_size)  # Lightning's DistributedSampler pads the ranks evenly
        batches = int(per_rank // per_device) if ds.get("drop_last") else math.ceil(per_rank / per_device)
        if batches < 1:
            raise HablaError(
                f"{clips} train clips over {world_size} rank(s) do not fill one batch of {per_device:g} "
                "(model.train_ds.drop_last is set): lower model.train_ds.batch_size"
            )
    limit = trainer.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        batches = limit if streamed else min(batches, limit)  # Lightning's cap (a stream's epoch length)
    elif isinstance(limit, float) and 0 < limit < 1:  # a stream's epoch becomes that many whole batches
        batches = max(1, int(batches * limit))
    steps_per_epoch = math.ceil(batches / accumulate)

    # The config counts steps of its tuned global batch: the same passes over the data at the batch habla chose
    # (an accumulation the config sets explicitly counts its own steps).
    length_scale = 1 / ratio if source == "global_batch" else 1.0
    max_steps, epochs = trainer.get("max_steps"), trainer.get("max_epochs")
    budgets = {}
    if isinstance(max_steps, int) and max_steps >= 0:
        budgets["max_steps"] = round(max_steps * length_scale)
    if isinstance(epochs, int) and epochs >= 0:
        budgets["max_epochs"] = epochs * steps_per_epoch
    if not budgets:
        raise HablaError(
            "cannot size the LR schedule: set trainer.max_steps (optimizer steps) or trainer.max_epochs to a "
            f"whole number >= 0 (got max_steps={max_steps!r}, max_epochs={epochs!r})"
        )
    budget_from = min(budgets, key=lambda k: (budgets[k], k != "max_steps"))
    steps = budgets[budget_from]

    # 4. Loader buffers within the workers' memory.
    worker_gib = _resource(cfg, "loader_worker_memory_gib", loader.LOADER_WORKER_MEMORY_GIB)
    process_gib = _resource(cfg, "process_memory_gib", loader.PROCESS_MEMORY_GIB)
    shuffle = _whole(ds.get("shuffle_buffer_size"), "model.train_ds.shuffle_buffer_size", 1)
    bucket = _whole(ds.get("bucket_buffer_size"), "model.train_ds.bucket_buffer_size", 1)
    sample_rate = int(cfg.model.get("sample_rate") or 16000)
    loading = loader.size_loader(int(ds.get("num_workers") or 0), worker_gib, mean * sample_rate, streamed, clips,
                                 per_device, None if bins is None else len(bins) + 1, shuffle, bucket)  # fmt: skip
    workers, bucket_buffer = loading.workers_per_device, loading.bucket_buffer

    # 5. batch_duration: Lhotse's sampler fills batches of the per-device batch on average.
    simulated = None
    if by_duration:
        if not bins:  # padded to the longest clip seen
            batch_duration = per_device * longest
        elif batch_duration is None or per_device < capacity_utterances or measured_capacity:
            # Each loader worker (or the main process) iterates one sampler for the whole run (NeMo keeps its
            # workers, Lhotse its iterator, across epochs): calibrate over that run's batches.
            run_batches = math.ceil(max(1, steps) * accumulate / max(1, workers))
            batch_duration, simulated = calibrate_batch_duration(durations, bins, per_device, run_batches,
                                                                  bucket_buffer)  # fmt: skip
            if batch_duration > capacity:  # never more padded audio than a device holds
                batch_duration = capacity
                simulated = simulated_batch(durations, bins, batch_duration, run_batches, bucket_buffer)
    batch_seconds = batch_duration if by_duration else per_device * longest
    node = loader.node_request(loading, devices_per_node, worker_gib, process_gib, batch_seconds * sample_rate)

    sched = cfg.model.get("optim", {}).get("sched") or {}
    warmup = sched.get("warmup_steps")
    if isinstance(warmup, int) and warmup > 0:
        warmup = round(warmup * length_scale)
        if steps > 0:
            cap = float((cfg.get("fine_tune") or {}).get("max_warmup_fraction") or MAX_WARMUP_FRACTION)
            warmup = min(warmup, math.floor(steps * cap))
    validate_every = _whole(cfg.get("validate_every_steps"), "validate_every_steps", 1)
    validate_every = min(max(1, steps), _scaled(validate_every, length_scale) or steps_per_epoch)
    checkpoint_every = _whole((cfg.get("checkpoint") or {}).get("every_n_train_steps"),
                              "checkpoint.every_n_train_steps", 1)  # fmt: skip
    return Budget(
        world_size=world_size,
        per_device_batch=round(per_device, 3),
        batch_duration=None if batch_duration is None else round(batch_duration, 3),
        device_capacity=round(capacity, 3),
        capacity_from=capacity_from,
        num_buckets=None if bins is None else len(bins) + 1,
        simulated_per_device_batch=None if simulated is None else round(simulated, 2),
        accumulate_grad_batches=accumulate,
        accumulation_from=source,
        global_batch=round(used, 3),
        tuned_global_batch=round(tuned if tuned is not None else used, 3),
        lr=None if tuned_lr is None else tuned_lr * lr_scale,
        tuned_lr=tuned_lr,
        lr_scale=round(lr_scale, 6),
        lr_rule=rule if rule is not None and source != "none" else None,
        train_clips=clips,
        train_hours=round(seconds / 3600, 4),
        batches_per_epoch=batches,
        steps_per_epoch=steps_per_epoch,
        max_steps=steps,
        budget_from=budget_from,
        epochs=round(steps / steps_per_epoch, 3),
        warmup_steps=warmup if isinstance(warmup, int) else None,
        validate_every_steps=validate_every,
        checkpoint_every_steps=_scaled(checkpoint_every, length_scale) or validate_every,
        loader=loading,
        node=node,
        bucket_duration_bins=None if bins is None else tuple(round(b, 4) for b in bins),
    )


def apply(cfg, budget: Budget, streamed: bool) -> None:
    """Write the decisions into the config NeMo and Lightning receive (and config.yaml records)."""
    from omegaconf import open_dict

    b = budget
    with open_dict(cfg):
        cfg.trainer.max_steps = b.max_steps
        cfg.trainer.accumulate_grad_batches = b.accumulate_grad_batches
        # Validation counted in batches across epochs (Lightning), so in optimizer steps whatever the epoch.
        cfg.trainer.val_check_interval = b.validate_every_steps * b.accumulate_grad_batches
        cfg.trainer.check_val_every_n_epoch = None
        if (cfg.get("checkpoint") or {}).get("every_n_train_steps") is not None:
            cfg.checkpoint.every_n_train_steps = b.checkpoint_every_steps
        optim = cfg.model.optim
        if b.lr_scale != 1.0 and b.lr is not None:
            optim.lr = b.lr
            if optim.get("sched") is not None and isinstance(optim.sched.get("min_lr"), (int, float)):
                optim.sched.min_lr = optim.sched.min_lr * b.lr_scale
        sched = optim.get("sched")
        if sched is not None and b.warmup_steps is not None:
            sched.warmup_steps = b.warmup_steps
        ds = cfg.model.train_ds
        if b.batch_duration is None:
            ds.batch_size = int(b.per_device_batch)
        if streamed:
            if not isinstance(cfg.trainer.get("limit_train_batches"), int):
                # A Lhotse stream of tar shards repeats forever: an epoch is one pass worth of batches per rank.
                cfg.trainer.limit_train_batches = b.batches_per_epoch
            # Lhotse fills these buffers before every epoch's first batch: sized to the worker's memory, and
            # never more than the train set (a larger buffer would read a small set many times over first).
            ds.shuffle_buffer_size = b.loader.shuffle_buffer
            ds.bucket_buffer_size = b.loader.bucket_buffer
            if b.batch_duration is not None:
                ds.batch_duration = b.batch_duration
                # batch_size would cap the utterances of a batch of short clips below what the duration allows
                ds.batch_size = None
            if b.bucket_duration_bins == ():  # one bucket: Lhotse's plain duration sampler
                ds.use_bucketing = False
            elif b.bucket_duration_bins is not None:
                ds.use_bucketing = True
                ds.bucket_duration_bins = list(b.bucket_duration_bins)
                ds.num_buckets = b.num_buckets
                if ds.get("concurrent_bucketing") is None:
                    # Lhotse fills the buckets from a thread that is not a daemon and stops only when the cuts
                    # run out, which an endless tar stream never does: the process would never exit (and every
                    # epoch would start one more). Filling inline costs little: loader workers do it.
                    ds.concurrent_bucketing = False


def describe(budget: Budget) -> list[str]:
    """The log lines of the decisions: batch and accumulation, learning rate, schedule, cadence and node."""
    b = budget
    per_device = (
        f"{b.batch_duration:g} s padded (≈ {b.per_device_batch:g} utterances, {b.num_buckets or 1} duration bucket(s))"
        if b.batch_duration is not None
        else f"{b.per_device_batch:g} utterances"
    )
    holds = f"{b.device_capacity:g} {'s' if b.batch_duration is not None else 'utterances'}"
    why = {"global_batch": f"for the config's global_batch {b.tuned_global_batch:g}; a device holds {holds}"
                           f"{' (measured)' if b.capacity_from == 'gpu' else ''}",
           "config": "set by trainer.accumulate_grad_batches",
           "none": "the config names no global_batch"}[b.accumulation_from]  # fmt: skip
    lr = "" if b.lr_rule is None else f"; learning rate × {b.lr_scale:.3g} ({b.lr_rule} scale_lr) = {b.lr:.3g}"
    node = b.node
    return [
        f"batch: {per_device} per device × {b.world_size} device{'s' if b.world_size > 1 else ''} × "
        f"accumulate {b.accumulate_grad_batches} ({why}) = global batch {b.global_batch:g}{lr}",
        f"schedule: {b.max_steps} optimizer steps (from trainer.{b.budget_from}) = {b.epochs:g} epoch(s) of "
        f"{b.steps_per_epoch} steps over {b.train_clips} clips ({b.train_hours:.2f} h); warmup "
        f"{b.warmup_steps if b.warmup_steps is not None else 'none'}; the LR schedule ends at step {b.max_steps}",
        f"cadence: validation every {b.validate_every_steps} steps, checkpoints every {b.checkpoint_every_steps}; "
        f"node: {node.processes} process(es) × {b.loader.workers_per_device} loader worker(s) -> request "
        f"{node.cpu} CPU, {node.memory} memory (of which {node.shared_memory_gib:g} GiB shared)",
    ]


def cautions(budget: Budget) -> list[str]:
    """What the plan should warn about before training: a global batch far from the tuned one, small buffers."""
    found = [budget.loader.buffer_warning] if budget.loader.buffer_warning else []
    b = budget
    if b.accumulation_from != "none" and b.lr_rule is None:
        ratio = b.global_batch / b.tuned_global_batch
        if abs(ratio - 1) > GLOBAL_BATCH_TOLERANCE:
            found.append(
                f"global batch {b.global_batch:g} is {ratio:.2f}× the {b.tuned_global_batch:g} the config's learning "
                "rate was tuned for (world size × per-device batch × accumulation); the LR is not rescaled: set "
                "scale_lr, or adjust model.train_ds.batch_size or trainer.accumulate_grad_batches"
            )
    return found


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
