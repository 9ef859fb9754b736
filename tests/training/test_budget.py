"""habla.training.budget: the global-batch contract per world size, and the run's budget in steps, decided from
the config and the train manifest (no NeMo). The training runs that check NeMo follows these decisions are in
test_train_budgets.py; two real torchrun processes in test_train_distributed.py."""

from __future__ import annotations

import bisect
import math
import random
from collections import Counter

import pytest

from habla.core.errors import HablaError
from habla.training import bucketing, budget, topology
from habla.training import config as train_config


def clips(n: int, seconds: float = 5.0) -> list[dict]:
    return [{"audio_filepath": f"c{i}.wav", "duration": seconds, "text": "hola"} for i in range(n)]


def world(size: int) -> int:
    """The world size habla train reads from a launcher's environment (two torchrun processes, say)."""
    if size == 1:
        return topology.detect({}).world_size
    env = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": str(size), "RANK": "0", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1"}  # fmt: skip
    return topology.detect(env).world_size


@pytest.mark.parametrize(
    "config, size, accumulate",
    [("fastconformer_ctc_bpe", 1, 16), ("fastconformer_ctc_bpe", 2, 8), ("quartznet15x5_char", 1, 16),
     ("quartznet15x5_char", 2, 8), ("tiny_ctc_char", 1, 1), ("tiny_ctc_char", 2, 1)],
)  # fmt: skip
def test_accumulation_keeps_the_tuned_global_batch_for_world_sizes_1_and_2(config, size, accumulate):
    cfg = train_config.load(config)
    plan = budget.plan(cfg, clips(100_000), world(size), streamed=False)
    assert plan.world_size == size and plan.accumulate_grad_batches == accumulate
    assert plan.accumulation_from == "global_batch" and plan.tuned_global_batch == cfg.global_batch
    # tiny_ctc_char is tuned for one CPU (8): two ranks hold 4 each instead of doubling it
    assert plan.global_batch == cfg.global_batch == plan.per_device_batch * size * accumulate
    assert plan.per_device_batch == min(cfg.model.train_ds.batch_size, cfg.global_batch / size)
    assert budget.cautions(plan) == [] and plan.lr_scale == 1 and plan.lr_rule is None


def _feasible(tuned: int, world_size: int, held: int) -> bool:
    """Brute force: some accumulation and whole per-device batch (at most ``held``) within 10 % of ``tuned``."""
    return any(
        abs(world_size * a * b / tuned - 1) <= budget.GLOBAL_BATCH_TOLERANCE
        for a in range(1, 2 * tuned + 1)
        for b in range(1, held + 1)
    )


@pytest.mark.parametrize("config", ["fastconformer_ctc_bpe", "quartznet15x5_char", "tiny_ctc_char"])
@pytest.mark.parametrize("gpus", [1, 3, 7, 8, 24, 64, 100, 512])
def test_the_global_batch_stays_within_ten_percent_and_the_epochs_stay_put(config, gpus):
    """Fixed batches (WAV files): whatever the world size, the global batch is the tuned one within 10 %, the
    per-device batch never exceeds what a device holds, and the run makes the same passes over the data; where
    no accumulation and per-device batch can (brute force), one line refuses."""
    cfg = train_config.load(config, ["trainer.max_epochs=-1", "trainer.max_steps=40000"])
    one = budget.plan(cfg, clips(400_000), 1, streamed=False)
    held = cfg.model.train_ds.batch_size
    if not _feasible(cfg.global_batch, gpus, held):  # tiny_ctc_char on 3 devices; QuartzNet's 1152 on 512
        with pytest.raises(
            HablaError, match=f"^{gpus} devices cannot train on global_batch {cfg.global_batch} within "
        ):
            budget.plan(cfg, clips(400_000), gpus, streamed=False)
        return
    plan = budget.plan(cfg, clips(400_000), gpus, streamed=False)
    assert abs(plan.global_batch / cfg.global_batch - 1) <= budget.GLOBAL_BATCH_TOLERANCE
    assert plan.per_device_batch <= held and plan.per_device_batch == int(plan.per_device_batch)
    assert plan.global_batch == plan.per_device_batch * gpus * plan.accumulate_grad_batches
    if gpus * held >= cfg.global_batch:  # no accumulation left: the per-device batch shrinks
        assert plan.accumulate_grad_batches == 1
    assert plan.epochs == pytest.approx(one.epochs, rel=0.01)  # steps follow the global batch used
    assert plan.max_steps == round(40000 * cfg.global_batch / plan.global_batch)
    # validation follows the steps: as many validations at any world size, never more
    assert plan.max_steps / plan.validate_every_steps == pytest.approx(40000 / cfg.validate_every_steps, rel=0.01)


def test_more_devices_than_the_global_batch_refuse_or_scale_the_learning_rate():
    cfg = train_config.load("tiny_ctc_char")  # global batch 8, lr 0.01 (scaled only on request)
    with pytest.raises(HablaError) as refused:
        budget.plan(cfg, clips(1000), 16, streamed=False)
    assert str(refused.value) == (
        "16 devices cannot train on global_batch 8 within 10% (the closest is 16 utterances per step): use another "
        "number of devices, or set scale_lr=linear or scale_lr=sqrt to scale the learning rate with the global batch"
    )
    for rule, factor in (("linear", 2.0), ("sqrt", math.sqrt(2))):
        scaled = train_config.load("tiny_ctc_char", [f"scale_lr={rule}", "trainer.max_steps=400"])
        plan = budget.plan(scaled, clips(1000), 16, streamed=False)
        assert plan.global_batch == 16 and plan.per_device_batch == 1 and plan.lr_rule == rule
        assert plan.lr_scale == pytest.approx(factor) and plan.lr == pytest.approx(scaled.model.optim.lr * factor)
        assert plan.max_steps == 200  # the same utterances: half the steps of twice the batch
        budget.apply(scaled, plan, streamed=False)
        assert scaled.model.optim.lr == pytest.approx(plan.lr) and scaled.model.train_ds.batch_size == 1
        assert scaled.model.optim.sched.min_lr == pytest.approx(
            train_config.load("tiny_ctc_char").model.optim.sched.min_lr * factor
        )
        assert plan.as_summary()["learning_rate"]["lr_rule"] == rule


def test_steps_per_epoch_follow_the_data_the_batch_and_the_world():
    cfg = train_config.load("quartznet15x5_char", ["trainer.max_steps=-1", "trainer.max_epochs=3"])
    entries = clips(10_000) + clips(7, seconds=30.0)  # 7 clips longer than max_duration 16.7: NeMo drops them
    one, two = (budget.plan(cfg, entries, size, streamed=False) for size in (1, 2))
    # drop_last (QuartzNet's SpecCutout cannot take a last batch of one short clip): whole batches only
    assert one.train_clips == 10_000 and one.batches_per_epoch == 10_000 // 72 == 138
    assert one.steps_per_epoch == math.ceil(138 / 16) and one.max_steps == 3 * one.steps_per_epoch
    assert two.batches_per_epoch == 5_000 // 72 and two.steps_per_epoch == math.ceil(69 / 8)
    tiny = budget.plan(train_config.load("tiny_ctc_char"), clips(1001), 2, streamed=False)
    assert tiny.batches_per_epoch == math.ceil(501 / 4)  # 4 per device for its global 8; a partial last batch counts
    assert one.budget_from == two.budget_from == "max_epochs" and one.epochs == 3


def test_the_budget_is_whichever_ends_first_and_the_warmup_fits_in_it():
    entries = clips(100_000)
    cfg = train_config.load("fastconformer_ctc_bpe")  # 100,000 steps, no epoch limit
    plan = budget.plan(cfg, entries, 1, streamed=False)
    assert (plan.max_steps, plan.budget_from, plan.warmup_steps) == (100_000, "max_steps", 15_000)
    # the pipeline's max_epochs=2 on top of the config's steps: two epochs end first
    cfg = train_config.load("fastconformer_ctc_bpe", ["trainer.max_epochs=2"])
    plan = budget.plan(cfg, entries, 1, streamed=False)
    assert plan.budget_from == "max_epochs" and plan.max_steps == 2 * plan.steps_per_epoch
    assert plan.warmup_steps == math.floor(plan.max_steps * budget.MAX_WARMUP_FRACTION) < 15_000


def common_voice_like(n: int) -> list[dict]:
    rng = random.Random(1)
    return [{"duration": min(20.0, max(0.5, rng.lognormvariate(1.5, 0.35)))} for _ in range(n)]


def test_bucketing_batches_hold_the_per_device_batch_on_average(monkeypatch):
    monkeypatch.setattr(bucketing, "CALIBRATION_BATCHES", 300)  # of a worker's run, simulated (1,000 in use)
    cfg = train_config.load("fastconformer_ctc_bpe", ["model.train_ds.num_workers=2", "model.train_ds.batch_size=32",
                                                      "global_batch=512"])  # 100,000 steps  # fmt: skip
    entries = common_voice_like(20_000)
    plan = budget.plan(cfg, entries, 2, streamed=True)
    durations = sorted(e["duration"] for e in entries)
    # buckets at the duration quantiles: about as many clips in each
    assert plan.num_buckets == 30 and len(plan.bucket_duration_bins) == 29
    bins = plan.bucket_duration_bins
    sizes = Counter(bisect.bisect_left(bins, d) for d in durations)
    assert max(sizes.values()) < 2 * min(sizes.values())
    # a device holds 32 clips of the longest duration; padded to their buckets, that is many more utterances,
    # so 2 devices accumulate fewer batches than 512 / (2 × 32) = 8, each of 512 / (2 × accumulation)
    assert plan.device_capacity == pytest.approx(32 * max(durations)) and plan.capacity_from == "config"
    capacity = plan.device_capacity / bucketing.mean_padded(durations, bins)
    assert plan.accumulate_grad_batches == math.ceil(512 / (2 * capacity)) < 8
    per_device = 512 / (2 * plan.accumulate_grad_batches)
    assert plan.per_device_batch == pytest.approx(per_device, abs=0.001) and plan.global_batch == pytest.approx(512)
    # batch_duration makes Lhotse's own sampler average that many utterances per batch over what a worker draws
    # in the run, where per-device batch × the padded mean gives more (Lhotse picks buckets uniformly)
    assert plan.simulated_per_device_batch == pytest.approx(per_device, rel=0.03)
    first_guess = per_device * bucketing.mean_padded(durations, bins)
    assert bucketing.simulated_batch(durations, bins, first_guess, 300, 10_000) > 1.05 * per_device
    assert plan.batch_duration < first_guess and plan.batch_duration <= plan.device_capacity
    # another draw of the sampler: still that many on average within a few percent
    assert bucketing.simulated_batch(durations, bins, plan.batch_duration, 300, 10_000, seed=7) == pytest.approx(
        per_device, rel=0.04)  # fmt: skip
    assert plan.batches_per_epoch == math.ceil(20_000 / (per_device * 2))

    budget.apply(cfg, plan, streamed=True)
    ds = cfg.model.train_ds
    assert ds.use_bucketing and tuple(ds.bucket_duration_bins) == bins and ds.batch_size is None
    assert ds.batch_duration == plan.batch_duration and ds.num_buckets == 30
    assert ds.concurrent_bucketing is False  # Lhotse's filler thread would keep the process from exiting
    assert cfg.trainer.limit_train_batches == plan.batches_per_epoch and cfg.trainer.max_steps == plan.max_steps
    assert cfg.trainer.accumulate_grad_batches == plan.accumulate_grad_batches
    assert (ds.shuffle_buffer_size, ds.bucket_buffer_size) == (plan.loader.shuffle_buffer, plan.loader.bucket_buffer)
    # WAV files go through NeMo's classic loader: a fixed batch of utterances, no duration batches
    plan = budget.plan(train_config.load("fastconformer_ctc_bpe"), entries, 2, streamed=False)
    assert (
        plan.batch_duration is None and plan.num_buckets is None and plan.batches_per_epoch == math.ceil(10_000 / 128)
    )


def test_padding_and_quantile_edges():
    """Lhotse pads a batch to its longest clip: 1-5 s clips share a bucket padded to 5 s, 6-9 s one to 9 s."""
    durations = [float(d) for d in range(1, 10)] * 10
    assert bucketing.bucket_bins(sorted(durations), 2) == [5.0]
    assert bucketing.mean_padded(durations, [5.0]) == pytest.approx((50 * 5 + 40 * 9) / 90)
    assert bucketing.mean_padded([1.0, 2.0, 3.0], []) == 3.0 and bucketing.bucket_bins([1.0, 2.0, 3.0, 4.0], 2) == [2.0]
    plan = budget.plan(train_config.load("tiny_ctc_char"), [{"duration": d} for d in durations], 1, streamed=True)
    assert plan.num_buckets == 2 and plan.bucket_duration_bins == (5.0,)  # 90 clips fill 2 buckets of 4 batches


def test_an_explicit_accumulation_or_batch_duration_wins():
    cfg = train_config.load("fastconformer_ctc_bpe", ["+trainer.accumulate_grad_batches=3",
                                                      "+model.train_ds.batch_duration=100"])  # fmt: skip
    plan = budget.plan(cfg, clips(1000, 4.0), 2, streamed=True)
    assert (plan.accumulate_grad_batches, plan.accumulation_from) == (3, "config")
    assert plan.batch_duration == 100 and plan.per_device_batch == 25 and plan.global_batch == 150
    assert plan.num_buckets == 1 and plan.bucket_duration_bins == ()  # 1,000 equal clips: nothing to bucket
    assert "0.07×" in budget.cautions(plan)[0] and plan.max_steps == 100_000  # its own steps: not rescaled


def test_a_run_whose_length_cannot_be_known_is_one_line():
    cfg = train_config.load("tiny_ctc_char")
    cfg.trainer.max_steps, cfg.trainer.max_epochs = -1, None  # past load()'s own check
    with pytest.raises(HablaError, match="cannot size the LR schedule: set trainer.max_steps"):
        budget.plan(cfg, clips(10), 1, streamed=False)
    with pytest.raises(HablaError, match="none of the 3 train clips is within"):
        budget.plan(train_config.load("tiny_ctc_char"), clips(3, 60.0), 1, streamed=False)
    with pytest.raises(HablaError, match="global_batch must be a whole number"):
        train_config.load("tiny_ctc_char", ["global_batch=0"])


def test_the_decisions_are_logged_in_three_lines(monkeypatch):
    monkeypatch.setattr(bucketing, "CALIBRATION_BATCHES", 50)
    cfg = train_config.load("fastconformer_ctc_bpe")
    batch, schedule, cadence = budget.describe(budget.plan(cfg, clips(4096, 5.0), 2, streamed=True))
    # 4,096 clips of 5 s: one bucket; a device holds 128 × 5 s = 640 s, 128 utterances
    assert batch == (
        "batch: 640 s padded (≈ 128 utterances, 1 duration bucket(s)) per device × 2 devices × accumulate 8 (for the "
        "config's global_batch 2048; a device holds 640 s) = global batch 2048"
    )
    assert schedule.startswith("schedule: 100000 optimizer steps (from trainer.max_steps) = 50000 epoch(s) of 2 steps")
    # shared memory: 8 workers × 2 prefetched batches × 640 s × 16 kHz × 4 bytes = 0.61 GiB; memory: the process's
    # 8 GiB + 8 workers × 3 GiB + that = 32.6 -> 33 GiB; CPU: 8 workers + 1
    assert cadence == ("cadence: validation every 2500 steps, checkpoints every 2500; node: 1 process(es) × 8 loader "
                       "worker(s) -> request 9 CPU, 33Gi memory (of which 0.61 GiB shared)")  # fmt: skip
