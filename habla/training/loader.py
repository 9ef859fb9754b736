"""What a training process's data loader holds, and what a node of the job requests for it.

Lhotse's shuffle and bucket buffers keep each buffered clip's bytes (a 16-bit WAV in the tar shard): habla sizes
both buffers so that a loader worker holds at most ``resources.loader_worker_memory_gib``, and a node requests, per
training process (one per GPU), its ``resources.process_memory_gib`` plus its workers' memory, the shared memory its
workers' prefetched batches take, and one CPU per worker plus one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Host memory (resources section of a config; these are the defaults)
LOADER_WORKER_MEMORY_GIB = 3.0
PROCESS_MEMORY_GIB = 8.0
LHOTSE_BUFFER = 10_000  # Lhotse's default shuffle and bucket buffers: more buys nothing
BUFFER_MEMORY_SHARE = 0.8  # of a worker's memory for its buffers; the rest decodes and collates
CLIP_OVERHEAD_BYTES = 4096  # a buffered clip's Lhotse objects besides its audio bytes
WAV_BYTES_PER_SAMPLE = 2  # tar shards hold 16-bit PCM WAV (habla prepare)
PREFETCH_FACTOR = 2  # PyTorch DataLoader's default: batches per worker waiting in shared memory
FLOAT_BYTES = 4  # a collated batch is float32 audio
GIB = 2**30


@dataclass(frozen=True)
class Loader:
    """One training process's data loading: workers and, on tar shards, Lhotse's buffers (in clips)."""

    workers_per_device: int
    shuffle_buffer: int | None  # Lhotse's streaming shuffle (tar shards only)
    bucket_buffer: int | None  # Lhotse's bucketing buffer (tar shards only)
    clip_bytes: int  # a buffered clip's estimated bytes
    memory_per_worker_gib: float  # what a worker's buffers hold, estimated
    buffer_warning: str | None = None


@dataclass(frozen=True)
class NodeRequest:
    """What one node of the job should request: per training process, its memory, its workers' memory and
    shared memory (prefetched batches), and a CPU per worker plus one."""

    processes: int  # training processes (GPUs) on the node
    cpu: int
    memory_gib: int  # request and limit (includes the shared memory: a tmpfs counts against the pod's memory)
    shared_memory_gib: float

    @property
    def memory(self) -> str:
        """As a Kubernetes quantity."""
        return f"{self.memory_gib}Gi"


def size_loader(
    workers: int,
    worker_gib: float,
    clip_samples: float,
    streamed: bool,
    clips: int,
    per_device: float,
    buckets: int | None,
    shuffle_buffer: int | None = None,
    bucket_buffer: int | None = None,
) -> Loader:
    """A training process's loader: ``workers`` workers of ``worker_gib`` each, over ``clips`` train clips of
    ``clip_samples`` samples on average. On tar shards (``streamed``) Lhotse's shuffle and bucket buffers take
    the configured sizes, else as many clips as fit in a worker's buffer share (at most Lhotse's default); a
    bucket buffer that cannot hold a batch per bucket is warned about."""
    clip_bytes = round(clip_samples * WAV_BYTES_PER_SAMPLE) + CLIP_OVERHEAD_BYTES
    buffer_warning = None
    if streamed:
        fits = int(worker_gib * GIB * BUFFER_MEMORY_SHARE / clip_bytes)
        default = max(1, min(LHOTSE_BUFFER, clips, fits // 2))
        shuffle_buffer, bucket_buffer = shuffle_buffer or default, bucket_buffer or default
        if buckets and bucket_buffer < buckets * per_device and bucket_buffer < clips:
            buffer_warning = (
                f"the bucket buffer ({bucket_buffer} clips) holds less than one batch of {per_device:.0f} per bucket "
                f"({buckets} buckets): batches come out smaller; raise resources.loader_worker_memory_gib"
            )
    else:
        shuffle_buffer = bucket_buffer = None
    return Loader(
        workers_per_device=workers,
        shuffle_buffer=shuffle_buffer,
        bucket_buffer=bucket_buffer,
        clip_bytes=clip_bytes,
        memory_per_worker_gib=round(((shuffle_buffer or 0) + (bucket_buffer or 0)) * clip_bytes / GIB, 3),
        buffer_warning=buffer_warning,
    )


def node_request(
    loader: Loader, devices_per_node: int, worker_gib: float, process_gib: float, batch_samples: float
) -> NodeRequest:
    """What a node of ``devices_per_node`` training processes requests: per process its own memory, its
    workers' (or, without workers, one worker's worth held by the process itself) and the shared memory of
    their prefetched batches of ``batch_samples`` samples; a CPU per worker plus one."""
    processes = max(1, devices_per_node)
    workers = loader.workers_per_device
    shared_gib = processes * workers * PREFETCH_FACTOR * batch_samples * FLOAT_BYTES / GIB
    return NodeRequest(
        processes=processes,
        cpu=processes * (workers + 1),
        memory_gib=math.ceil(processes * (process_gib + max(1, workers) * worker_gib) + shared_gib),
        shared_memory_gib=round(shared_gib, 2),
    )
