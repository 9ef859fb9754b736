"""GPU batch sizing (habla.training.sizing) on this CPU: the OOM-safe search against probes that run out of memory
past a generated threshold, the probe's NeMo calls on a real (tiny) CTC model, the agreement of real torchrun
ranks over gloo, and the plan a measured capacity gives."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from fixtures.commands import cli_env, free_port
from hypothesis import given, settings
from hypothesis import strategies as st

from habla.core.errors import HablaError
from habla.training import budget, sizing
from habla.training import config as train_config


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 5000), threshold=st.integers(0, 6000))
def test_the_search_finds_the_largest_batch_that_fits_in_few_probes(limit, threshold):
    probed = []

    def fits(n: int) -> bool:
        probed.append(n)
        return n <= threshold

    assert sizing.largest(fits, limit) == min(threshold, limit)
    assert all(1 <= n <= limit for n in probed) and len(probed) <= 2 * limit.bit_length() + 1


def test_running_out_of_gpu_memory_is_an_answer_and_any_other_error_is_not():
    import torch

    def probe(n: int) -> None:
        if n > 12:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if n == 7:
            raise ValueError("a bug in the probe")

    fits = sizing.oom_safe(probe)
    assert fits(12) and not fits(13)
    with pytest.raises(ValueError):
        fits(7)
    assert sizing.measure(sizing.oom_safe(lambda n: probe(n) if n != 7 else None), 20.0, 2560.0) == pytest.approx(
        12 * 20.0 * sizing.SAFETY)  # fmt: skip
    with pytest.raises(HablaError, match=r"^the GPU cannot hold a training step on one 20.0 s clip: lower "):
        sizing.measure(lambda n: False, 20.0, 2560.0)


def test_a_measured_capacity_replaces_the_configs_in_the_plan():
    """A GPU that holds twice the config's 128 × 20 s: one device accumulates half as many batches, each twice
    as large; what it measured is in the plan (train_summary.json's batch section)."""
    cfg = train_config.load("fastconformer_ctc_bpe")
    entries = [{"duration": d} for d in [2.0, 4.0, 6.0, 20.0] * 2500]
    config = budget.plan(cfg, entries, 1, streamed=True)
    measured = budget.plan(cfg, entries, 1, streamed=True, measured_capacity=2 * 128 * 20.0)
    assert (config.capacity_from, measured.capacity_from) == ("config", "gpu")
    assert measured.device_capacity == 2 * config.device_capacity
    assert measured.accumulate_grad_batches < config.accumulate_grad_batches
    assert measured.global_batch == pytest.approx(2048) == config.global_batch
    assert measured.batch_duration > config.batch_duration and "(measured)" in budget.describe(measured)[0]


@pytest.mark.slow  # builds a NeMo model
def test_the_probe_runs_a_training_step_of_a_real_ctc_model(tmp_path):
    """The probe's NeMo calls (forward, CTC loss, backward) on the tiny model, on this CPU where nothing runs out
    of memory: the gradients it produced were cleared, the optimizer-state stand-in is the model's size × 2."""
    from nemo.collections.asr.models import EncDecCTCModel

    cfg = train_config.load("tiny_ctc_char")
    cfg.model.train_ds = cfg.model.validation_ds = None
    model = EncDecCTCModel(cfg=cfg.model)
    step = sizing.ctc_probe(model, 3.0, 16000, "cpu", bf16=False)
    assert sizing.largest(sizing.oom_safe(step), 3) == 3
    assert all(p.grad is None for p in model.parameters())
    assert sum(t.numel() for t in step.state) == 2 * sum(p.numel() for p in model.parameters())


AGREE = textwrap.dedent(
    """
    import os
    import sys
    import torch.distributed as dist
    from lightning.fabric.plugins.environments import TorchElasticEnvironment
    from lightning.fabric.utilities.distributed import _init_dist_connection
    from habla.training import sizing

    rank = int(os.environ["RANK"])
    agreed = sizing.agree(1000.0 + 500 * rank)  # rank 0 holds less
    _init_dist_connection(TorchElasticEnvironment(), "gloo")  # what Lightning's DDP does next: keeps the group
    dist.barrier()
    # one file per rank: two ranks printing to one pipe can interleave their lines
    with open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w") as f:
        f.write(f"rank {rank} agreed {agreed} backend {dist.get_backend()}")
    """
)


@pytest.mark.slow  # two real processes
def test_every_rank_takes_the_smallest_capacity_and_lightning_keeps_the_group(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port())]  # fmt: skip
    result = subprocess.run([*torchrun, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                            env=cli_env())  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(p.read_text() for p in tmp_path.glob("rank*.txt"))
    assert lines == ["rank 0 agreed 1000.0 backend gloo", "rank 1 agreed 1000.0 backend gloo"]
