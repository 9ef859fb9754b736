"""Training benchmark (not a test): CPU training throughput of tiny_ctc_char, and data-loading throughput from
local WAV files vs NeMo tar shards streamed from a loopback S3 server (moto), side by side in one run.

    PYTHONPATH=. python bench/bench_training.py [--steps 150] [--rounds 3] [--json out.json]
    PYTHONPATH=. python bench/bench_training.py --gpu --steps 200     # fastconformer_ctc_bpe, bf16, one GPU

Data: every clip ``habla prepare --train-source validated`` keeps from the bundled release
(data/mini-es-v25/es): train, dev and test, 16 kHz WAV. Throughput is in audio seconds per wall second.
Training: seconds of audio in the batches of ``fit`` over its wall time (no validation inside fit).
Loading: the NeMo dataloader alone (what training pulls from), ``batch_size`` 8 and ``num_workers`` 0
as in tiny_ctc_char; local WAV through NeMo's classic dataset, tar shards through Lhotse from S3 exactly as
``habla train --train-tars`` configures it. Rounds alternate the variants so that load from other
processes on this shared machine hits all of them alike; the median is reported.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from habla.core import storage
from habla.data.options import PrepareOptions
from habla.data.prepare import prepare

RELEASE = REPO / "data" / "mini-es-v25" / "es"


def build_clips(folder: Path) -> list[dict]:
    """Every clip ``habla prepare`` keeps from the bundled release (train from validated.tsv, dev, test)."""
    prepare(str(RELEASE), str(folder), PrepareOptions(shards=1, train_source="validated"), workers=2)
    return [
        json.loads(line)
        for split in ("train", "dev", "test")
        for line in (folder / "manifests" / f"{split}.json").read_text().splitlines()
    ]


def write_jsonl(entries: list[dict], uri: str) -> None:
    storage.write_text(uri, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))


def upload_shards(entries: list[dict], prefix: str, shards: int) -> tuple[str, str]:
    for k in range(shards):
        members = entries[k::shards]
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for e in members:
                tar.add(e["audio_filepath"], arcname=Path(e["audio_filepath"]).name)
        storage.write_bytes(f"{prefix}/audio_{k}.tar", buffer.getvalue())
        write_jsonl([{**e, "audio_filepath": Path(e["audio_filepath"]).name, "shard_id": k} for e in members],
                    f"{prefix}/manifest_{k}.json")  # fmt: skip
    return f"{prefix}/manifest__OP_0..{shards - 1}_CL_.json", f"{prefix}/audio__OP_0..{shards - 1}_CL_.tar"


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    return proc, endpoint


def loading_rate(model, ds_cfg, batches: int) -> float:
    """Audio seconds per second pulled through the model's train dataloader (epochs restart as needed)."""
    from omegaconf import OmegaConf

    loader = model._setup_dataloader_from_config(OmegaConf.create(ds_cfg))
    seconds, seen, started = 0.0, 0, time.perf_counter()
    while seen < batches:
        for batch in loader:
            seconds += float(batch[1].sum()) / 16000
            seen += 1
            if seen >= batches:
                break
    return seconds / (time.perf_counter() - started)


def training_rate(manifest: str, out: str, steps: int, config: str = "tiny_ctc_char", extra: tuple = ()) -> float:
    from habla.training.train import train

    overrides = [f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1000", *extra]
    if config == "tiny_ctc_char":
        overrides.append("validate_every_steps=1000000")  # no validation inside fit
    summary = train(config, manifest, manifest, out, overrides)
    return summary["audio_hours_seen"] * 3600 / summary["fit_seconds"]


def gpu_fastconformer(manifest: str, work: Path, steps: int) -> None:
    """fastconformer_ctc_bpe in bf16 on one GPU (only where one is lent: none was for the figures in RESULTS.md)."""
    import torch

    if not torch.cuda.is_available():
        sys.exit("--gpu: no CUDA device here")
    # the config's per-device batch (128, bf16-mixed: does it fit 80 GB?), no accumulation, no validation inside
    # fit: the rate is training alone
    extra = ("trainer.accelerator=gpu", "global_batch=128", "model.train_ds.num_workers=4",
             "model.optim.sched.warmup_steps=10", "validate_every_steps=100000")  # fmt: skip
    warm = training_rate(manifest, str(work / "gpu-warmup"), 10, "fastconformer_ctc_bpe", extra)
    rate = training_rate(manifest, str(work / "gpu"), steps, "fastconformer_ctc_bpe", extra)
    print(f"fastconformer_ctc_bpe bf16 on {torch.cuda.get_device_name()}: {rate:.0f} audio-s/s "
          f"(warm-up run {warm:.0f}); peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per training measurement")
    parser.add_argument("--batches", type=int, default=300, help="batches per loading measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--json", help="write the raw figures here")
    parser.add_argument("--gpu", action="store_true", help="only: fastconformer_ctc_bpe in bf16 on one GPU")
    args = parser.parse_args()

    import torch

    work = Path(tempfile.mkdtemp(prefix="habla-bench-train-"))
    os.environ["HABLA_CACHE"] = str(work / "cache")
    (work / "wav").mkdir()
    entries = build_clips(work / "wav")
    hours = sum(e["duration"] for e in entries) / 3600
    manifest = str(work / "train_manifest.json")
    write_jsonl(entries, manifest)
    if args.gpu:
        gpu_fastconformer(manifest, work, args.steps)
        return
    moto, _ = start_moto()
    try:
        storage.s3_client().create_bucket(Bucket="bench")
        manifest_pattern, tar_pattern = upload_shards(entries, "s3://bench/tarred", args.shards)

        from nemo.collections.asr.models import EncDecCTCModel

        from habla.training import config as train_config

        cfg = train_config.load("tiny_ctc_char")
        cfg.model.train_ds.manifest_filepath = cfg.model.validation_ds.manifest_filepath = manifest
        model = EncDecCTCModel(cfg=cfg.model)
        local_ds = dict(cfg.model.train_ds)
        tar_ds = {**local_ds, "manifest_filepath": manifest_pattern, "tarred_audio_filepaths": tar_pattern,
                  "is_tarred": True, "use_lhotse": True, "shuffle_buffer_size": len(entries)}  # fmt: skip

        results: dict[str, list[float]] = {"train_1_thread": [], "train_2_threads": [], "load_local_wav": [],
                                           "load_s3_tar_lhotse": []}  # fmt: skip
        for round_ in range(args.rounds):
            results["load_local_wav"].append(loading_rate(model, local_ds, args.batches))
            results["load_s3_tar_lhotse"].append(loading_rate(model, tar_ds, args.batches))
            for threads in (1, 2):
                torch.set_num_threads(threads)
                key = "train_1_thread" if threads == 1 else "train_2_threads"
                results[key].append(training_rate(manifest, str(work / f"run-{round_}-{threads}"), args.steps))
            torch.set_num_threads(1)
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in results.items()), flush=True)
    finally:
        moto.terminate()

    medians = {k: statistics.median(v) for k, v in results.items()}
    best_train = max(medians["train_1_thread"], medians["train_2_threads"])
    print(f"\n{len(entries)} clips, {hours * 60:.1f} min of audio; {args.steps} steps of batch 8; "
          f"{args.batches} batches per loading run; median of {args.rounds} rounds (audio-s/s)\n")  # fmt: skip
    print("| measurement | audio s / s | × best training rate |")
    print("|---|---|---|")
    for key, value in medians.items():
        print(f"| {key} | {value:.0f} | {value / best_train:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"clips": len(entries), "hours": hours, "args": vars(args),
                                               "rounds": results, "medians": medians}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
