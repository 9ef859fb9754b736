"""quartznet15x5_char: speed perturbation (0.85–1.15) and SpecAugment as NVIDIA's DeepLearningExamples QuartzNet
15x5 recipe, applied by NeMo's own data layer to real clips."""

from __future__ import annotations

import pytest
from fixtures.commands import read_jsonl

from habla.training import config as train_config

pytestmark = pytest.mark.slow


def test_speed_perturbation_and_spec_augment_follow_the_recipe(clips30, one_thread):
    from nemo.collections.asr.models import EncDecCTCModel

    cfg = train_config.load("quartznet15x5_char")
    speed = cfg.model.train_ds.augmentor.speed
    assert (speed.min_speed_rate, speed.max_speed_rate, speed.prob, speed.num_rates) == (0.85, 1.15, 0.1, -1)
    spec = cfg.model.spec_augment
    assert (spec.freq_masks, spec.freq_width, spec.time_masks, spec.time_width) == (2, 15, 2, 55)
    assert spec.get("rect_masks") is None

    overrides = ["model.train_ds.num_workers=0", "model.validation_ds.num_workers=0", "model.train_ds.batch_size=8",
                 "model.train_ds.shuffle=false", "model.train_ds.trim_silence=false", "model.train_ds.drop_last=false",
                 "model.train_ds.augmentor.speed.prob=1.0"]  # fmt: skip
    cfg = train_config.load("quartznet15x5_char", overrides)
    cfg.model.train_ds.manifest_filepath = cfg.model.validation_ds.manifest_filepath = str(clips30)
    model = EncDecCTCModel(cfg=cfg.model)
    _, lengths, _, _ = next(iter(model._train_dl))
    natural = [round(e["duration"] * 16000) for e in read_jsonl(clips30)][: len(lengths)]  # manifest order
    # NeMo resamples to sample_rate × rate, so a clip's length over its natural length is the rate drawn
    ratios = [int(n) / m for m, n in zip(natural, lengths)]
    # the clips of the batch played at other speeds within 0.85-1.15 (a uniform rate: one may land near 1)
    assert all(0.849 <= r <= 1.151 for r in ratios), (lengths, natural)
    assert sum(abs(r - 1) > 0.003 for r in ratios) >= len(ratios) - 2, (lengths, natural)
    assert model.spec_augmentation is not None
