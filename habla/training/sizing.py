"""How much padded audio one GPU holds per batch: an OOM-safe search, as NeMo's ``oomptimizer.py`` does.

A config's ``batch_size`` was sized for some GPU (``batch_size`` clips of ``max_duration`` on an 80 GB card);
the GPU a run lands on may hold more or less. With ``resources.gpu_batch_search`` (and tar shards, whose
batches are durations), ``habla train`` on a GPU measures it before training: a forward and backward pass
of the model, in the run's precision, on a batch of the longest train clip repeated ``n`` times, with the
optimizer's state allocated; ``n`` doubles while it fits, then bisects. A batch of the longest clips is the
worst case for any bucket: shorter clips fill the same padded seconds with less attention. The capacity is
``n × longest × SAFETY`` seconds; every rank measures its own GPU and the smallest wins (the batch plan must
be the same on every rank). habla.training.budget then derives the per-device batch and the accumulation
from it, and train_summary.json records it (``batch.capacity_from: gpu``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from habla.core.errors import HablaError

log = logging.getLogger("habla.train")

SAFETY = 0.9  # of the largest batch that fitted: fragmentation, longer transcripts, other buckets' shapes
SEARCH_LIMIT = 16  # × the config's own capacity: the search stops there


def largest(fits: Callable[[int], bool], limit: int) -> int:
    """The largest ``n`` in 1..``limit`` for which ``fits(n)``, assuming that whatever fits, less fits too
    (0 if even 1 does not). Doubles from 1 while it fits, then bisects: O(log limit) probes."""
    if limit < 1 or not fits(1):
        return 0
    good = 1
    while good < limit:
        trial = min(2 * good, limit)
        if not fits(trial):
            bad = trial
            break
        good = trial
    else:
        return good
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def oom_safe(probe: Callable[[int], None]) -> Callable[[int], bool]:
    """``probe(n)`` as a predicate: False when it ran out of GPU memory (the cache is emptied for the next)."""
    import torch

    def fits(n: int) -> bool:
        try:
            probe(n)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    return fits


def ctc_probe(model, seconds: float, sample_rate: int, device, bf16: bool) -> Callable[[int], None]:
    """A training step's memory for a NeMo CTC model on ``n`` clips of ``seconds``: forward, CTC loss and
    backward in the run's precision, on random audio with random transcripts of a plausible length."""
    import torch

    model.to(device).train()
    # the optimizer's state (AdamW: two fp32 moments per parameter) lives on the GPU during training
    state = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters() for _ in range(2)]
    vocabulary = len(model.decoder.vocabulary)
    samples = int(seconds * sample_rate)
    tokens = max(1, int(seconds * 15))  # ~15 characters per second of Spanish speech: an upper bound for BPE

    def step(n: int) -> None:
        audio = torch.randn(n, samples, device=device)
        lengths = torch.full((n,), samples, device=device, dtype=torch.long)
        targets = torch.randint(0, vocabulary, (n, tokens), device=device)
        target_lengths = torch.full((n,), tokens, device=device, dtype=torch.long)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            log_probs, encoded_len, _ = model.forward(input_signal=audio, input_signal_length=lengths)
            loss = model.loss(log_probs=log_probs, targets=targets, input_lengths=encoded_len,
                              target_lengths=torch.minimum(target_lengths, encoded_len))  # fmt: skip
        loss.backward()
        model.zero_grad(set_to_none=True)

    step.state = state  # kept alive with the probe
    return step


def agree(value: float) -> float:
    """The smallest ``value`` over the ranks of this job (itself when alone). Starts the default process group
    from the launcher's environment when needed; Lightning then uses it as it is."""
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return value
    if not dist.is_initialized():
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return value
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return float(tensor.item())


def measure(fits: Callable[[int], bool], seconds: float, config_capacity: float) -> float:
    """Padded seconds per batch this GPU holds (all ranks agreed): ``largest`` clips of ``seconds`` that fit,
    × SAFETY. HablaError when not even one fits."""
    limit = max(1, int(SEARCH_LIMIT * config_capacity / seconds))
    clips = largest(fits, limit)
    capacity = agree(clips * seconds * SAFETY)
    if capacity <= 0:
        raise HablaError(
            f"the GPU cannot hold a training step on one {seconds:.1f} s clip: lower model.train_ds.max_duration, "
            "use a smaller model or a larger GPU"
        )
    log.info("GPU batch search: %d clips of %.1f s fit; batches hold up to %.0f s of padded audio "
             "(× %.1f; the config's own: %.0f s)", clips, seconds, capacity, SAFETY, config_capacity)  # fmt: skip
    return capacity
