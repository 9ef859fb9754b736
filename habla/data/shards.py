"""How a plan deals its clips into shards: the automatic shard count, shards balanced by duration (each a
conversion task), and the train split's tar shards, shuffled. A split's clips are given by their weights (the
duration table's seconds, or DEFAULT_CLIP_SECONDS) and their paths (unique within the split)."""

from __future__ import annotations

import heapq
import math
import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from habla.core.errors import HablaError
from habla.data.options import MAX_SHARDS, PrepareOptions

# Automatic shard count (shard_count): audio per shard, and data-loader workers per training rank (the GPU
# training configs' model.train_ds.num_workers).
HOURS_PER_SHARD = 20.0
LOADER_WORKERS = 8


def by_path(paths: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Indices that order ``paths`` (code point order, as Python compares strings: UTF-8 bytes compare so)."""
    return pc.sort_indices(paths).to_numpy()


def balance(weights: np.ndarray, ordered: np.ndarray, shards: int) -> np.ndarray:
    """The shard of each clip of one split: longest clip first onto the lightest shard, clips of the same length
    in path order (``ordered``: :func:`by_path`); deterministic.

    Every split is spread over ``min(shards, len(clips))`` shards, so shard k holds about 1/N of every split:
    shards take about the same time, and the tar shards of a split are numbered 0..m-1 without gaps.
    """
    count = min(shards, len(weights))
    order = ordered[np.argsort(-weights[ordered], kind="stable")]
    heap = [(0.0, k) for k in range(count)]
    dealt = [0] * len(order)
    replace = heapq.heapreplace  # the heap's smallest replaced: what heappop then heappush leave, faster
    for j, weight in enumerate(weights[order].tolist()):
        load, k = heap[0]
        dealt[j] = k
        replace(heap, (load + weight, k))
    out = np.empty(len(weights), dtype=np.int64)
    out[order] = dealt
    return out


def shard_count(weights: list[np.ndarray], options: PrepareOptions) -> int:
    """``--shards`` when given. Else one shard per HOURS_PER_SHARD hours of audio (a conversion task of a few
    minutes), and with ``--format tar`` rounded up to a multiple of world size × LOADER_WORKERS: every loader
    worker of every rank then streams a shard of its own (NeMo's tarred loaders want that multiple).
    ``weights``: each split's, in the order of ``--splits``."""
    if options.shards is not None:
        return options.shards
    seconds = sum(np.concatenate(weights).tolist()) if weights else 0
    count = max(1, math.ceil(seconds / 3600 / HOURS_PER_SHARD))
    if options.format == "tar":
        readers = options.world_size * LOADER_WORKERS
        count = math.ceil(count / readers) * readers
        if count > MAX_SHARDS:
            raise HablaError(
                f"--world-size {options.world_size} × {LOADER_WORKERS} loader workers needs {count} tar shards, over "
                f"the {MAX_SHARDS} allowed: give --shards"
            )
    return count


def deal_tar_shards(paths: pa.Array | pa.ChunkedArray, shards: int, seed: int) -> list[np.ndarray]:
    """The train split's tar shards (clip indices, in their order): its clips in a seeded random order, dealt
    round-robin over ``min(shards, len(clips))`` shards (sizes differ by one clip at most). Each shard, written in
    that order, is a random sample of the whole split: no recording session or path range clusters in a shard,
    so batches streamed from any shard are mixed without relying on the loader's shuffle buffer."""
    order = by_path(paths).tolist()  # the same input order whatever the TSV order
    random.Random(seed).shuffle(order)
    count = min(shards, len(order))
    dealt = np.asarray(order, dtype=np.int64)
    return [dealt[k::count] for k in range(count)] + [np.empty(0, dtype=np.int64) for _ in range(shards - count)]
