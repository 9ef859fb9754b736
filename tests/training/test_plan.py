"""The run's plan before any GPU-hour is spent: ``habla train --dry-run`` for 1, 8, 64 and 512 GPUs of the
published FastConformer recipe on a Common-Voice-sized train set (358 k clips of Common-Voice-like durations,
tar shards): the global batch holds, the run makes the same passes over the data and validates as often
whatever the world size, and a node's requests cover what its loaders hold."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
from fixtures.commands import cli_env, write_manifest

from habla.training import bucketing, budget
from habla.training import config as train_config
from habla.training.loader import BUFFER_MEMORY_SHARE, LHOTSE_BUFFER
from habla.training.train import plan_run

CV_CLIPS = 358_000  # Common Voice es 25.0 train


@pytest.fixture(scope="module")
def cv_entries() -> list[dict]:
    rng = random.Random(1)
    durations = (min(20.0, max(0.5, rng.lognormvariate(1.5, 0.35))) for _ in range(CV_CLIPS))
    return [
        {"audio_filepath": f"clips/c{i}.wav", "text": "hola", "duration": round(d, 3)} for i, d in enumerate(durations)
    ]


@pytest.fixture(scope="module")
def cv_manifest(cv_entries, tmp_path_factory):
    return write_manifest(cv_entries, tmp_path_factory.mktemp("plan") / "train.json")


def test_plans_for_1_8_64_and_512_gpus(cv_entries, monkeypatch):
    monkeypatch.setattr(bucketing, "CALIBRATION_BATCHES", 100)  # a shorter simulation of Lhotse's sampler
    monkeypatch.setattr(bucketing, "CALIBRATION_CLIPS", 20_000)  # over a sample of the durations
    monkeypatch.setattr(bucketing, "CALIBRATION_CUTS", 10_000)
    cfg = train_config.load("fastconformer_ctc_bpe")
    plans = {}
    for gpus in (1, 8, 64, 512):  # nodes of up to 8 GPUs
        plan = budget.plan(cfg, cv_entries, gpus, streamed=True, devices_per_node=min(gpus, 8))
        plans[gpus] = {**plan.as_summary(), "warnings": budget.cautions(plan)}
    one = plans[1]
    for gpus, plan in plans.items():
        batch, schedule, cadence, loader, node = (plan[k] for k in ("batch", "schedule", "cadence", "loader", "node"))
        assert batch["world_size"] == gpus
        # the tuned global batch (2048) within 10 %, from smaller per-device batches as the world grows
        assert abs(batch["global_batch"] / 2048 - 1) <= 0.1 and batch["tuned_global_batch"] == 2048
        assert batch["global_batch"] == pytest.approx(
            batch["per_device_batch"] * gpus * batch["accumulate_grad_batches"]
        )
        assert batch["simulated_per_device_batch"] == pytest.approx(batch["per_device_batch"], rel=0.1)
        assert batch["batch_duration"] <= batch["device_capacity"] == pytest.approx(128 * 20, rel=0.02)
        # the same passes over the data, the same validations: 8 × 8 finishes sooner, not later
        assert schedule["epochs"] == pytest.approx(one["schedule"]["epochs"], rel=0.01)
        assert schedule["max_steps"] == pytest.approx(100_000, rel=0.1) and cadence["validations"] == 40
        assert plan["learning_rate"] == one["learning_rate"] == {"lr": 0.001, "tuned_lr": 0.001, "lr_scale": 1.0,
                                                                "lr_rule": None, "warmup_steps": 15000}  # fmt: skip
        # loaders hold what their memory allows; a node asks for its processes, workers and shared memory
        assert loader["memory_per_worker_gib"] <= 3.0 * BUFFER_MEMORY_SHARE
        assert 0 < loader["shuffle_buffer"] <= LHOTSE_BUFFER and loader["bucket_buffer"] <= LHOTSE_BUFFER
        devices = min(gpus, 8)
        assert node["processes"] == devices and node["cpu"] == devices * (8 + 1)
        assert node["memory_gib"] == math.ceil(devices * (8.0 + 8 * 3.0) + node["shared_memory_gib"])
    per_device = [plans[g]["batch"]["per_device_batch"] for g in (1, 8, 64, 512)]
    assert per_device == sorted(per_device, reverse=True) and per_device[-1] == 4  # 2048 / 512
    assert [plans[g]["batch"]["accumulate_grad_batches"] for g in (8, 64, 512)] == [1, 1, 1]
    assert plans[1]["batch"]["accumulate_grad_batches"] > 1
    # one GPU's 400-odd utterances per batch need a larger bucket buffer than 3 GiB per worker holds: said
    assert any("bucket buffer" in w for w in plans[1]["warnings"]) and plans[512]["warnings"] == []


def test_the_dry_run_prints_the_plan_and_builds_nothing(cv_manifest, tmp_path):
    """The CLI prints what plan_run returns, without importing NeMo or Lightning (``-X importtime`` lists every
    module the process imported)."""
    small = tmp_path / "train.json"
    small.write_text("".join(cv_manifest.read_text().splitlines(keepends=True)[:3000]))
    args = ["--config", "fastconformer_ctc_bpe", "--train-manifest", str(small), "--train-tars",
            "s3://b/audio__OP_0..7_CL_.tar", "--nodes", "8", "--gpus-per-node", "8"]  # fmt: skip
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "habla", "train", "--dry-run", *args],
                            capture_output=True, text=True, env=cli_env(), timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert "lhotse" in imported and not {"nemo", "lightning", "pytorch_lightning"} & imported
    printed = json.loads(result.stdout)
    assert printed == plan_run("fastconformer_ctc_bpe", str(small), train_tars="s3://b/audio__OP_0..7_CL_.tar",
                               nodes=8, gpus_per_node=8)  # fmt: skip
    assert printed["world"] == {"nodes": 8, "gpus_per_node": 8, "world_size": 64}


@pytest.mark.parametrize(
    "extra, message",
    [(["--nodes", "0", "--dry-run"], "--nodes must be a whole number >= 1 (got 0)"),
     (["--nodes", "2"], "--nodes and --gpus-per-node go with --dry-run"),
     ([], "habla train needs --val-manifest and --out (or --dry-run for the plan alone)"),
     (["--dry-run", "--nodes", "300", "--gpus-per-node", "8"], "2400 devices cannot train on global_batch 2048")],
)  # fmt: skip
def test_a_plan_that_cannot_be_is_one_line(cv_manifest, tmp_path, extra, message):
    small = tmp_path / "train.json"
    small.write_text("".join(cv_manifest.read_text().splitlines(keepends=True)[:500]))
    command = [
        sys.executable,
        "-m",
        "habla",
        "train",
        "--config",
        "fastconformer_ctc_bpe",
        "--train-manifest",
        str(small),
    ]
    result = subprocess.run([*command, *extra], capture_output=True, text=True, env=cli_env())
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_container_smaller_than_the_plans_node_is_warned_about(cv_entries, tmp_path, caplog, monkeypatch):
    from habla.training import topology
    from habla.training.train import _log_plan

    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("max\n")  # cgroup v2 without a limit
    assert topology.memory_limit_gib((str(v2),)) is None
    v1.write_text("9223372036854771712\n")  # cgroup v1's "no limit"
    assert topology.memory_limit_gib((str(tmp_path / "absent"), str(v1))) is None
    v2.write_text(f"{64 * 2**30}\n")
    assert topology.memory_limit_gib((str(v2), str(v1))) == 64

    monkeypatch.setattr(bucketing, "CALIBRATION_CUTS", 10_000)
    plan = budget.plan(train_config.load("fastconformer_ctc_bpe"), cv_entries[:20_000], 64, streamed=True,
                       devices_per_node=8)  # fmt: skip
    with caplog.at_level("WARNING", logger="habla"):
        _log_plan(plan, memory_limit_gib=plan.node.memory_gib)
        assert not [r for r in caplog.records if "memory limit" in r.getMessage()]
        _log_plan(plan, memory_limit_gib=32)
    (warning,) = [r.getMessage() for r in caplog.records if "memory limit" in r.getMessage()]
    assert warning.startswith(f"this container's memory limit, 32 GiB, is below the {plan.node.memory} the plan")
