"""The unchanged ``habla train`` under torchrun: two "nodes" (two torchrun processes, one worker each), gloo
on loopback, on CPU. Each node has its own cache folder (nodes share no disk) and DST is in a loopback S3
server. Both exit 0 without hanging, Lightning ran DDP over both, only rank 0 wrote, and a second launch
with --resume continues on both nodes from the checkpoint in S3."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from fixtures.commands import HABLA, TORCHRUN, cli_env, free_port

from habla.core import storage

pytestmark = pytest.mark.slow


def run_two_nodes(tmp: Path, name: str, args: list[str]) -> list[str]:
    """Launch node 0 and node 1 like two pods would; return their logs (fails on a hang or a non-zero exit)."""
    port = free_port()
    procs, logs = [], []
    for node_rank in (0, 1):
        log_path = tmp / f"{name}-node{node_rank}.log"
        logs.append(log_path)
        env = cli_env(HABLA_CACHE=str(tmp / f"node{node_rank}-disk"))
        command = [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node_rank),
                   "--master-addr", "127.0.0.1", "--master-port", str(port), "--no-python", HABLA, "train", *args]  # fmt: skip  # noqa: E501
        procs.append(subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env))
    try:
        codes = [p.wait(timeout=420) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("torchrun hung:\n" + "\n".join(path.read_text()[-2000:] for path in logs))
    text = [path.read_text() for path in logs]
    assert codes == [0, 0], "\n\n".join(t[-3000:] for t in text)
    return text


def test_two_torchrun_nodes_train_with_ddp_resume_from_s3_and_only_rank_0_writes(tmp_path, clips30, s3_bucket):
    started = time.monotonic()
    dst = f"{s3_bucket}/run/model"
    args = ["--config", "tiny_ctc_char", "--train-manifest", str(clips30), "--val-manifest", str(clips30),
            "--out", dst, "validate_every_steps=10", "checkpoint.every_n_train_steps=10"]  # fmt: skip
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1")  # the s3 fixture's, inherited

    text = run_two_nodes(tmp_path, "first", [*args, "trainer.max_steps=20"])
    summary = json.loads(storage.read_text(f"{dst}/train_summary.json"))
    assert (summary["world_size"], summary["nodes"], summary["devices"], summary["steps"]) == (2, 2, 1, 20)
    # the global-batch contract at world size 2: tiny_ctc_char is tuned for 8 utterances per step (one CPU); two
    # ranks hold 4 each, and both say so
    mean_clip = sum(json.loads(line)["duration"] for line in clips30.read_text().splitlines()) / 30
    assert summary["audio_hours_seen"] * 3600 == pytest.approx(20 * 8 * mean_clip, rel=0.25)
    assert storage.exists(f"{dst}/model.nemo") and storage.exists(f"{dst}/checkpoints/last.ckpt")
    batch = summary["batch"]
    assert (batch["world_size"], batch["per_device_batch"], batch["accumulate_grad_batches"]) == (2, 4, 1)
    assert (batch["global_batch"], batch["tuned_global_batch"]) == (8, 8)
    assert batch["measured_global_batch"] == 7.5  # 15 clips per rank: steps of 4 + 4 three times, then 3 + 3
    assert all("× 2 devices × accumulate 1 (for the config's global_batch 8; a device holds 8 utterances) = "
               "global batch 8" in t for t in text)  # fmt: skip
    assert not any("the config's learning rate was tuned for" in t for t in text)
    assert "rank 0/2 (node 0/2, 1 process per node, torchrun)" in text[0]
    assert "rank 1/2 (node 1/2, 1 process per node, torchrun)" in text[1]
    assert "rank 0 wrote" in text[0] and "rank 1 done; rank 0 writes the artifacts" in text[1]
    # uploads (checkpoints, model, summary) come from rank 0 only; the summary JSON is printed by it only
    assert "checkpoint step 10 -> s3://" in text[0] and " -> s3://" not in text[1] and "rank 0 wrote" not in text[1]
    assert '"world_size": 2' in text[0] and '"world_size": 2' not in text[1]
    # node 1's disk holds no checkpoint: nothing was written there
    assert not list((tmp_path / "node1-disk").rglob("*.ckpt"))

    # Both nodes start again on fresh disks: each pulls last.ckpt from S3 and the step count goes on.
    text = run_two_nodes(tmp_path, "resumed", [*args, "trainer.max_steps=30", "--resume"])
    summary = json.loads(storage.read_text(f"{dst}/train_summary.json"))
    assert (summary["steps"], summary["resumed_from_step"], summary["world_size"]) == (30, 20, 2)
    assert all("resumed at step 20" in t for t in text)
    print(f"two-node torchrun runs (20 steps, then resumed to 30): {time.monotonic() - started:.0f}s")


@pytest.mark.parametrize("launcher", ["pytorchjob", "trainjob"])
def test_one_process_per_pod_without_torchrun(tmp_path, clips30, launcher):
    """A PyTorchJob (MASTER_ADDR/RANK/WORLD_SIZE per pod) or a TrainJob whose command is habla train (PET_*)."""
    port, out = free_port(), tmp_path / "model"
    procs, logs = [], []
    for rank in (0, 1):
        if launcher == "pytorchjob":
            pod = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank)}
        else:
            pod = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(rank),
                   "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}  # fmt: skip
        env = cli_env(HABLA_CACHE=str(tmp_path / f"pod{rank}"), **pod)
        logs.append(tmp_path / f"pod{rank}.log")
        command = [HABLA, "train", "--config", "tiny_ctc_char", "--train-manifest", str(clips30),
                   "--val-manifest", str(clips30), "--out", str(out), "trainer.max_steps=6"]  # fmt: skip
        procs.append(subprocess.Popen(command, stdout=logs[-1].open("w"), stderr=subprocess.STDOUT, env=env))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{launcher} pods hung")
    text = [path.read_text() for path in logs]
    assert codes == [0, 0], "\n\n".join(t[-3000:] for t in text)
    assert f"rank 1/2 (node 1/2, 1 process per node, {launcher})" in text[1]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in text[1]
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["world_size"], summary["nodes"], summary["devices"], summary["steps"]) == (2, 2, 1, 6)
    assert "rank 0 wrote" in text[0] and "rank 0 wrote" not in text[1]
