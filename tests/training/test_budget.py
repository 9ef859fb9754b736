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
from habla.training import budget, topology
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
    assert plan.global_batch == cfg.model.train_ds.batch_size * size * accumulate
    # tiny_ctc_char is tuned for one CPU (8): two ranks cannot accumulate less than 1 and double it
    warning = budget.global_batch_warning(plan)
    assert (warning is None) == (plan.global_batch == cfg.global_batch)
    if warning:
        assert "2.00×" in warning and "not rescaled" in warning


def test_steps_per_epoch_follow_the_data_the_batch_and_the_world():
    cfg = train_config.load("quartznet15x5_char", ["trainer.max_steps=-1", "trainer.max_epochs=3"])
    entries = clips(10_000) + clips(7, seconds=30.0)  # 7 clips longer than max_duration 16.7: NeMo drops them
    one, two = (budget.plan(cfg, entries, size, streamed=False) for size in (1, 2))
    # drop_last (QuartzNet's SpecCutout cannot take a last batch of one short clip): whole batches only
    assert one.train_clips == 10_000 and one.batches_per_epoch == 10_000 // 72 == 138
    assert one.steps_per_epoch == math.ceil(138 / 16) and one.max_steps == 3 * one.steps_per_epoch
    assert two.batches_per_epoch == 5_000 // 72 and two.steps_per_epoch == math.ceil(69 / 8)
    tiny = budget.plan(train_config.load("tiny_ctc_char"), clips(1001), 2, streamed=False)
    assert tiny.batches_per_epoch == math.ceil(501 / 8)  # the last, partial batch counts
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
    monkeypatch.setattr(budget, "CALIBRATION_BATCHES", 300)  # of a worker's run, simulated (1,000 in use)
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
    # batch_duration makes Lhotse's own sampler average 32 utterances per batch over what a worker draws in the
    # run, where batch_size × the padded mean gives more (Lhotse picks buckets uniformly, not by their size)
    assert plan.per_device_batch == 32 and plan.simulated_per_device_batch == pytest.approx(32, rel=0.03)
    first_guess = 32 * budget.mean_padded(durations, bins)
    assert budget.simulated_batch(durations, bins, first_guess, 300, 10_000) > 1.05 * 32
    assert plan.batch_duration < first_guess and plan.batch_duration < 32 * max(durations)  # fits what 32 fit
    # another draw of the sampler: still 32 on average within a few percent
    assert budget.simulated_batch(durations, bins, plan.batch_duration, 300, 10_000, seed=7) == pytest.approx(
        32, rel=0.04)  # fmt: skip
    assert plan.batches_per_epoch == math.ceil(20_000 / (32 * 2)) and plan.accumulate_grad_batches == 8

    budget.apply(cfg, plan, streamed=True)
    ds = cfg.model.train_ds
    assert ds.use_bucketing and tuple(ds.bucket_duration_bins) == bins and ds.batch_size is None
    assert ds.batch_duration == plan.batch_duration and ds.num_buckets == 30
    assert ds.concurrent_bucketing is False  # Lhotse's filler thread would keep the process from exiting
    assert cfg.trainer.limit_train_batches == plan.batches_per_epoch and cfg.trainer.max_steps == plan.max_steps
    assert cfg.trainer.accumulate_grad_batches == 8
    # WAV files go through NeMo's classic loader: a fixed batch of utterances, no duration batches
    plan = budget.plan(train_config.load("fastconformer_ctc_bpe"), entries, 2, streamed=False)
    assert (
        plan.batch_duration is None and plan.num_buckets is None and plan.batches_per_epoch == math.ceil(10_000 / 128)
    )


def test_padding_and_quantile_edges():
    """Lhotse pads a batch to its longest clip: 1-5 s clips share a bucket padded to 5 s, 6-9 s one to 9 s."""
    durations = [float(d) for d in range(1, 10)] * 10
    assert budget.bucket_bins(sorted(durations), 2) == [5.0]
    assert budget.mean_padded(durations, [5.0]) == pytest.approx((50 * 5 + 40 * 9) / 90)
    assert budget.mean_padded([1.0, 2.0, 3.0], []) == 3.0 and budget.bucket_bins([1.0, 2.0, 3.0, 4.0], 2) == [2.0]
    plan = budget.plan(train_config.load("tiny_ctc_char"), [{"duration": d} for d in durations], 1, streamed=True)
    assert plan.num_buckets == 2 and plan.bucket_duration_bins == (5.0,)  # 90 clips fill 2 buckets of 4 batches


def test_an_explicit_accumulation_or_batch_duration_wins():
    cfg = train_config.load("fastconformer_ctc_bpe", ["+trainer.accumulate_grad_batches=3",
                                                      "+model.train_ds.batch_duration=100"])  # fmt: skip
    plan = budget.plan(cfg, clips(1000, 4.0), 2, streamed=True)
    assert (plan.accumulate_grad_batches, plan.accumulation_from) == (3, "config")
    assert plan.batch_duration == 100 and plan.per_device_batch == 25 and plan.global_batch == 150
    assert plan.num_buckets == 1 and plan.bucket_duration_bins == ()  # 1,000 equal clips: nothing to bucket
    assert "0.07×" in budget.global_batch_warning(plan)


def test_a_run_whose_length_cannot_be_known_is_one_line():
    cfg = train_config.load("tiny_ctc_char")
    cfg.trainer.max_steps, cfg.trainer.max_epochs = -1, None  # past load()'s own check
    with pytest.raises(HablaError, match="cannot size the LR schedule: set trainer.max_steps"):
        budget.plan(cfg, clips(10), 1, streamed=False)
    with pytest.raises(HablaError, match="none of the 3 train clips is within"):
        budget.plan(train_config.load("tiny_ctc_char"), clips(3, 60.0), 1, streamed=False)
    with pytest.raises(HablaError, match="global_batch must be a whole number"):
        train_config.load("tiny_ctc_char", ["global_batch=0"])


def test_the_decisions_are_logged_in_two_lines(monkeypatch):
    monkeypatch.setattr(budget, "CALIBRATION_BATCHES", 50)
    cfg = train_config.load("fastconformer_ctc_bpe")
    batch, schedule = budget.describe(budget.plan(cfg, clips(4096, 5.0), 2, streamed=True))
    assert batch == ("batch: 640 s padded (≈ 128 utterances, 1 duration bucket(s)) per device × 2 devices × "
                     "accumulate 8 (for the config's global_batch 2048) = global batch 2048")  # fmt: skip
    assert schedule.startswith("schedule: 100000 optimizer steps (from trainer.max_steps) = 50000 epoch(s) of 2 steps")
