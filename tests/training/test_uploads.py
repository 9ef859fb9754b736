"""Checkpoint uploads in the background (habla.training.uploads) against a real S3 server process (moto) behind a
proxy that makes checkpoint writes slow: training hands a checkpoint over and goes on; what reaches the store
is what was saved, in order, superseded versions skipped; a store that is down stops the run. Then training
itself, on a real SeaweedFS behind the same slow proxy: the steps do not wait for the store, and a run killed
while an upload is under way resumes exactly from the last checkpoint the store holds."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
from fixtures.commands import HABLA, cli_env, free_port, read_jsonl
from fixtures.s3 import SLOW_WRITE_S, _bucket_behind_proxy, use_endpoint

from habla.core import storage
from habla.core.errors import Fault
from habla.training.uploads import BackgroundUploads

SLOW = 1.5  # seconds per checkpoint write at the proxy


@pytest.fixture
def slow_s3(moto_server, monkeypatch):
    yield from _bucket_behind_proxy(moto_server, monkeypatch, fail_before=0, fail_after=0, slow_writes=SLOW,
                                    slow_paths="/checkpoints/")  # fmt: skip


def _under_way(proxy, count: int = 1) -> None:
    """Until ``count`` slow checkpoint writes have reached the proxy (the uploader thread took them up)."""
    deadline = time.monotonic() + 10
    while proxy.slowed < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.slowed >= count


def _write(path, data: bytes) -> None:
    """As Lightning saves (fsspec's transaction): a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_the_hand_over_does_not_wait_and_the_store_gets_the_latest_in_order(slow_s3, tmp_path):
    bucket, proxy = slow_s3
    remote = f"{bucket}/run/checkpoints"
    local = tmp_path / "checkpoints"
    local.mkdir()
    uploads = BackgroundUploads()
    started = time.monotonic()
    _write(local / "last.ckpt", b"step 10")
    uploads.upload(local / "last.ckpt", f"{remote}/last.ckpt", "step 10")  # starts at once (SLOW s)
    _under_way(proxy)
    _write(local / "best-10.ckpt", b"best 10")
    uploads.upload(local / "best-10.ckpt", f"{remote}/best-10.ckpt", "step 10")
    _write(local / "last.ckpt", b"step 20")  # saved again while step 10 is still on its way
    uploads.upload(local / "last.ckpt", f"{remote}/last.ckpt", "step 20")
    (local / "best-10.ckpt").unlink()  # top-k rotation before its upload even started
    uploads.remove(f"{remote}/best-10.ckpt")
    handed_over = time.monotonic() - started
    assert handed_over < SLOW / 2  # no hand-over waited for the store
    uploads.wait()
    assert storage.read_bytes(f"{remote}/last.ckpt") == b"step 20"
    assert not storage.exists(f"{remote}/best-10.ckpt")
    # step 10's last.ckpt was uploaded (it had started), best-10 never was (removed first): 2 slow writes, not 3
    assert proxy.slowed == 2
    assert not list((tmp_path / ".checkpoints-uploads").iterdir())  # no snapshot left behind


@pytest.mark.slow  # imports Lightning
def test_what_is_uploaded_is_what_lightning_saved_even_when_it_saves_again(slow_s3, tmp_path):
    """Lightning's own writer (TorchCheckpointIO) replaces last.ckpt while its previous version is uploading: the
    upload reads a hard link to the version handed over."""
    import torch

    from habla.training.callbacks import MirroredCheckpointIO

    bucket, proxy = slow_s3
    mirror = MirroredCheckpointIO(f"{bucket}/run/checkpoints")
    path = tmp_path / "checkpoints" / "last.ckpt"
    mirror.save_checkpoint({"global_step": 10, "w": torch.zeros(1000)}, path)
    snapshot = next((tmp_path / ".checkpoints-uploads").iterdir())
    _under_way(proxy)
    mirror.save_checkpoint({"global_step": 20, "w": torch.ones(1000)}, path)
    assert torch.load(snapshot, weights_only=False)["global_step"] == 10  # the file being uploaded is unchanged
    assert torch.load(path, weights_only=False)["global_step"] == 20
    mirror.wait()
    local = tmp_path / "fetched.ckpt"
    storage.download_file(f"{bucket}/run/checkpoints/last.ckpt", local)
    assert torch.load(local, weights_only=False)["global_step"] == 20


def test_a_store_slower_than_the_checkpoints_makes_the_hand_over_wait_for_a_free_slot(slow_s3, tmp_path):
    bucket, proxy = slow_s3
    uploads = BackgroundUploads(max_waiting=1)
    times = []
    for step in range(3):  # three different files: nothing supersedes anything
        path = tmp_path / "checkpoints" / f"step={step}.ckpt"
        path.parent.mkdir(exist_ok=True)
        _write(path, f"step {step}".encode())
        started = time.monotonic()
        uploads.upload(path, f"{bucket}/checkpoints/{path.name}", f"step {step}")
        times.append(time.monotonic() - started)
        if step == 0:
            _under_way(proxy)
    # the first starts at once, the second waits in the queue, the third waits for the first to finish
    assert times[0] < SLOW / 2 and times[1] < SLOW / 2 and times[2] > SLOW / 2
    uploads.wait()
    assert [storage.read_bytes(f"{bucket}/checkpoints/step={s}.ckpt") for s in range(3)] == [
        b"step 0", b"step 1", b"step 2"]  # fmt: skip


def test_a_store_that_is_down_stops_the_run_instead_of_training_with_nothing_saved(tmp_path, monkeypatch, caplog):
    use_endpoint(monkeypatch, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage._client_for_pid.cache_clear()
    uploads = BackgroundUploads(max_failures=2)
    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    caplog.set_level(logging.ERROR, logger="habla.train")
    for step in (1, 2):
        _write(path, b"x")
        uploads.upload(path, f"s3://b/checkpoints/last-{step}.ckpt", f"step {step}")
    with pytest.raises(Fault, match=r"checkpoint upload to s3://b/checkpoints/last-\d.ckpt failed: "):
        uploads.wait()  # the end of the run: the latest version of a file is not in the store
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 2 and all("-> s3://b/checkpoints/last-" in m for m in failures)
    _write(path, b"x")
    with pytest.raises(Fault, match="^2 checkpoint uploads in a row failed"):
        uploads.upload(path, "s3://b/checkpoints/last-3.ckpt", "step 3")  # the next save stops the run
    storage._client_for_pid.cache_clear()


STEP_LINE = re.compile(r"step (\d+)/")


@pytest.mark.slow
def test_a_slow_object_store_does_not_slow_the_training_steps(slow_seaweedfs, clips30, cache, one_thread, caplog):
    """Each checkpoint write takes SLOW_WRITE_S at the store; checkpoints come every 4 steps of a few tens of ms:
    were the uploads synchronous, a step would wait SLOW_WRITE_S after each validation."""
    from habla.training.train import train

    bucket, proxy = slow_seaweedfs
    caplog.set_level(logging.INFO, logger="habla.train")
    dst = f"{bucket}/run/model"
    summary = train("tiny_ctc_char", str(clips30), str(clips30), dst,
                    ["trainer.max_steps=40", "validate_every_steps=4", "trainer.log_every_n_steps=1"])  # fmt: skip
    steps = [(r.created, int(m[1])) for r in caplog.records if (m := STEP_LINE.match(r.getMessage()))]
    assert [s for _, s in steps] == list(range(1, 41))
    gaps = [b - a for (a, _), (b, _) in zip(steps, steps[1:])]
    uploads_during_fit = proxy.slowed
    assert uploads_during_fit >= 2  # the store was busy while training went on
    assert max(gaps) < SLOW_WRITE_S / 2, f"a step waited {max(gaps):.1f} s"
    # every checkpoint reached the store by the end: last.ckpt holds step 40
    local = cache / "fetched.ckpt"
    storage.download_file(f"{dst}/checkpoints/last.ckpt", local)
    import torch

    assert torch.load(local, weights_only=False)["global_step"] == 40 and summary["steps"] == 40
    print(f"{len(gaps)} steps, longest gap {max(gaps):.2f} s; {proxy.slowed} checkpoint writes of {SLOW_WRITE_S} s")


@pytest.mark.slow
def test_a_run_killed_during_an_upload_resumes_from_the_last_checkpoint_the_store_holds(
    slow_seaweedfs, clips30, cache, one_thread, tmp_path
):
    import torch

    from habla.training.train import train

    bucket, proxy = slow_seaweedfs
    # Uploads shorter than the fixture's: on a fast machine the 300 steps end within one 8 s upload, and the run
    # would finish before a later upload could be caught under way.
    proxy.slow_writes = 1.5
    dst = f"{bucket}/run/model"
    overrides = ["trainer.max_steps=300", "validate_every_steps=10"]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        [HABLA, "train", "--config", "tiny_ctc_char", "--train-manifest", str(clips30), "--val-manifest",
         str(clips30), "--out", dst, *overrides],
        stdout=log, stderr=subprocess.STDOUT, env=cli_env(HABLA_CACHE=str(cache)),
    )  # fmt: skip
    deadline = time.monotonic() + 240
    remote_last = f"{dst}/checkpoints/last.ckpt"
    log_tail = lambda: (tmp_path / "first.log").read_text()[-3000:]  # noqa: E731
    # one upload done, another under way: the store holds an older checkpoint than the one being written
    while not (storage.exists(remote_last) and proxy.writing) and first.poll() is None:
        assert time.monotonic() < deadline, log_tail()
        time.sleep(0.05)
    assert first.poll() is None, "the run ended before an upload was caught under way: " + log_tail()
    first.send_signal(signal.SIGKILL)
    first.wait()
    # A write whose body the store had received still lands after the writer dies (as on a real store): what
    # the store holds is settled once the proxy has no write in flight.
    while proxy.writing:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    storage.download_file(remote_last, tmp_path / "held.ckpt")
    held = int(torch.load(tmp_path / "held.ckpt", weights_only=False)["global_step"])
    assert 0 < held < 300 and held % 10 == 0 and not storage.exists(f"{dst}/model.nemo")

    shutil.rmtree(cache / "runs")  # a new pod: nothing of the killed run's local copy survives
    proxy.slow_writes = 0
    summary = train("tiny_ctc_char", str(clips30), str(clips30), dst, overrides, resume=True)
    assert summary["resumed_from_step"] == held and summary["steps"] == 300
    # the counters came back with the checkpoint: 300 steps of 8 clips in all
    mean_clip = sum(e["duration"] for e in read_jsonl(clips30)) / 30
    assert summary["audio_hours_seen"] * 3600 == pytest.approx(300 * 8 * mean_clip, rel=0.15)
    print(f"killed with step {held} in the store and a later upload under way; resumed at {held}")
