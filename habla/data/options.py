"""What decides a prepared dataset's content (:class:`PrepareOptions`), and the bundled default release.

Light on purpose (no numpy, no audio libraries): the CLI reads the defaults from here to build ``--help``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from habla.core.errors import HablaError

#: The small real-speech release in Common Voice layout that ships with habla (data/README.md).
BUNDLED_RELEASE = str(Path(__file__).resolve().parents[2] / "data" / "mini-es-v25" / "es")
SPLITS = ("train", "dev", "test")
MAX_SHARDS = 10_000
#: The shortest clip kept whatever --min-duration says (a few STFT windows; less cannot be trained on).
MIN_CLIP_SECONDS = 0.1
#: Test clips are decoded up to this long (the training range does not apply to them; a bound on the work).
TEST_MAX_SECONDS = 600.0


@dataclass(frozen=True)
class PrepareOptions:
    """Everything that decides the content of a prepared dataset (recorded in plan.json)."""

    splits: tuple[str, ...] = SPLITS
    train_source: str = "train"  # "validated": validated.tsv minus dev/test speakers, sentences and clips
    format: str = "wav"  # "tar": every split as NeMo tarred shards
    shards: int | None = None  # None: from the data size and world_size (habla.data.shards.shard_count)
    world_size: int = 1  # GPUs in all of the training the tar shards are sized for
    shard_seed: int = 0  # the shuffle of the train clips over the tar shards
    locale: str = "es"
    min_duration: float = 0.5
    max_duration: float = 20.0
    # Characters (of normalized text) per second of audio outside this range mean a wrong transcript or a
    # mostly silent clip. NeMo-speech-data-processor's Spanish recipe uses 1-21; CV clips carry leading and
    # trailing silence, which lowers the rate of short sentences.
    min_chars_per_second: float = 1.0
    max_chars_per_second: float = 21.0

    def __post_init__(self) -> None:
        # One order whatever order they were given in: "dev,train" and "train,dev" are the same dataset.
        known = sorted((s for s in self.splits if s in SPLITS), key=SPLITS.index)
        object.__setattr__(self, "splits", (*known, *(s for s in self.splits if s not in SPLITS)))

    def validate(self) -> None:
        unknown = [s for s in self.splits if s not in SPLITS]
        if unknown or not self.splits:
            raise HablaError(f"--splits must be a comma-separated subset of train,dev,test (got {unknown or 'none'})")
        repeated = sorted({s for s in self.splits if self.splits.count(s) > 1})
        if repeated:
            raise HablaError(f"--splits names {', '.join(repeated)} more than once")
        for name in ("min_duration", "max_duration", "min_chars_per_second", "max_chars_per_second"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise HablaError(f"--{name.replace('_', '-')} must be a finite number (got {value!r})")
        for name, value, top in (("shards", self.shards, MAX_SHARDS), ("world-size", self.world_size, MAX_SHARDS)):
            if value is None and name == "shards":  # from the data size and world size
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise HablaError(f"--{name} must be an integer from 1 to {top} (got {value!r})")
        if isinstance(self.shard_seed, bool) or not isinstance(self.shard_seed, int):
            raise HablaError(f"--shard-seed must be an integer (got {self.shard_seed!r})")
        if not re.fullmatch(r"[A-Za-z]{2,3}(-[A-Za-z0-9]+)*", str(self.locale)):
            raise HablaError(f"--locale must be a Common Voice locale such as es or zh-TW (got {self.locale!r})")
        if self.train_source not in ("train", "validated"):
            raise HablaError(f"--train-source must be train or validated (got {self.train_source!r})")
        if self.format not in ("wav", "tar"):
            raise HablaError(f"--format must be wav or tar (got {self.format!r})")
        if not 0 <= self.min_duration < self.max_duration:
            raise HablaError(
                f"need 0 <= --min-duration < --max-duration (got {self.min_duration}, {self.max_duration})"
            )
        if not 0 <= self.min_chars_per_second < self.max_chars_per_second:
            raise HablaError("need 0 <= --min-chars-per-second < --max-chars-per-second")

    def as_json(self) -> dict:
        """The options as JSON values (tuples as lists), as recorded in plan.json."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, values: dict) -> PrepareOptions:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def fingerprint(release: str, options: PrepareOptions) -> str:
    """A short stable id of (release, options), e.g. for cache keys and output folder names."""
    blob = json.dumps([release, options.as_json()], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
