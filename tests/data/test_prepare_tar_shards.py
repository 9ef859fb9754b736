"""habla prepare --format tar: the train clips are shuffled over the tar shards (seeded, recorded in the
report), and the shard count follows the data size and the world size the shards are for."""

from __future__ import annotations

import json
import logging
import tarfile

import numpy as np
from fixtures.commands import run_habla
from fixtures.releases import MINI

from habla.data import prepare as prep
from habla.data import shards
from habla.data.options import PrepareOptions


def shard_paths(out, shards: int) -> list[list[str]]:
    """The train clips of each planned shard, in the order they are written into its tar."""
    return [
        [c["path"] for c in map(json.loads, (out / "plan" / f"shard-{k:05d}.jsonl").read_text().splitlines())
         if c["split"] == "train"]
        for k in range(shards)
    ]  # fmt: skip


def test_train_clips_are_shuffled_over_the_shards_with_a_recorded_seed(tmp_path):
    options = PrepareOptions(shards=4, format="tar", shard_seed=7)
    report = prep.prepare(str(MINI), str(tmp_path / "a"), options, workers=2)
    planned = shard_paths(tmp_path / "a", 4)
    in_path_order = sorted(p for shard in planned for p in shard)
    assert len(in_path_order) == len(set(in_path_order)) and max(map(len, planned)) - min(map(len, planned)) <= 1
    # Not cut in path order (the old way): the first quarter of the paths lands in every shard, and no shard
    # is written in path order.
    first_quarter = set(in_path_order[: len(in_path_order) // 4])
    assert all(first_quarter & set(shard) for shard in planned)
    assert all(shard != sorted(shard) for shard in planned)
    # The tars hold exactly that order, and the train manifest lists every clip once.
    for k, shard in enumerate(planned):
        with tarfile.open(tmp_path / "a" / "tarred" / "train" / f"audio_{k}.tar") as tar:
            assert tar.getnames() == [p.replace(".mp3", ".wav") for p in shard]
    train = [json.loads(line) for line in (tmp_path / "a" / "manifests" / "train.json").read_text().splitlines()]
    assert sorted(e["path"] for e in train) == in_path_order
    # The seed is in the report; the same seed plans the same shards, another seed others.
    assert report["options"]["shard_seed"] == 7 and "shard_seed=7" in (tmp_path / "a" / "report.md").read_text()
    prep.plan(str(MINI), str(tmp_path / "b"), options)
    assert shard_paths(tmp_path / "b", 4) == planned
    prep.plan(str(MINI), str(tmp_path / "c"), PrepareOptions(shards=4, format="tar", shard_seed=8))
    assert shard_paths(tmp_path / "c", 4) != planned


def clips(hours: float) -> np.ndarray:
    """The weights (seconds) of a split of 5-second clips."""
    return np.full(round(hours * 3600 / 5), 5.0)


def test_the_shard_count_follows_data_size_and_world_size():
    data = [clips(90), clips(5), clips(5)]  # 100 h
    assert shards.shard_count(data, PrepareOptions()) == 5  # WAV: one shard per 20 h
    assert shards.shard_count(data, PrepareOptions(format="tar")) == 8  # a multiple of 1 × 8 loader workers
    assert shards.shard_count(data, PrepareOptions(format="tar", world_size=2)) == 16
    assert shards.shard_count([clips(700)], PrepareOptions(format="tar", world_size=2)) == 48  # 35 -> 48
    assert shards.shard_count(data, PrepareOptions(format="tar", shards=3, world_size=2)) == 3  # as asked


def test_a_count_that_does_not_divide_is_warned_about(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="habla.prepare"):
        prep.plan(str(MINI), str(tmp_path / "three"), PrepareOptions(shards=3, format="tar"))
        assert "3 train tar shards is not a multiple of world size 1 × 8 loader workers" in caplog.text
        caplog.clear()
        summary = prep.plan(str(MINI), str(tmp_path / "auto"), PrepareOptions(format="tar", world_size=2))
        assert summary["num_shards"] == 16 and summary["tar_shards"] == {"train": 16, "dev": 16, "test": 16}
        assert not caplog.text
    result = run_habla("prepare", "--out", str(tmp_path / "bad"), "--world-size", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--world-size must be an integer from 1 to" in result.stderr
