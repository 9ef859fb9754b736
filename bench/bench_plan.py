#!/usr/bin/env python3
"""Plan benchmark (not a test): ``habla train --dry-run`` of the published FastConformer recipe at 1, 8, 64 and
512 GPUs on a Common-Voice-sized train set, each a fresh process, with its wall time. Results: bench/RESULTS.md.

    .venv/bin/python bench/bench_plan.py [--clips 358000] [--config fastconformer_ctc_bpe] [--gpus 1,8,64,512]

The train manifest holds ``--clips`` clips whose durations follow a log-normal around 4.8 s (Common Voice es
25.0 ``train``: 358 k clips, ≈ 480 h), as tar shards would list them; the dry run reads only their durations.
Nodes have 8 GPUs (fewer for a smaller world).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def manifest(path: Path, clips: int) -> None:
    rng = random.Random(1)
    with path.open("w") as out:
        for i in range(clips):
            duration = min(20.0, max(0.5, rng.lognormvariate(1.5, 0.35)))
            out.write(json.dumps({"audio_filepath": f"clips/c{i}.wav", "text": "hola", "duration": round(duration, 3)})
                      + "\n")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=358_000)
    parser.add_argument("--config", default="fastconformer_ctc_bpe")
    parser.add_argument("--gpus", default="1,8,64,512")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "train.json"
        manifest(train, args.clips)
        rows = []
        for gpus in (int(g) for g in args.gpus.split(",")):
            nodes, per_node = max(1, gpus // 8), min(gpus, 8)
            command = [sys.executable, "-m", "habla", "train", "--config", args.config, "--train-manifest", str(train),
                       "--train-tars", "s3://b/audio__OP_0..511_CL_.tar", "--dry-run", "--nodes", str(nodes),
                       "--gpus-per-node", str(per_node)]  # fmt: skip
            started = time.monotonic()
            result = subprocess.run(command, capture_output=True, text=True)
            wall = time.monotonic() - started
            if result.returncode:
                rows.append(f"| {gpus} | {nodes} × {per_node} | {result.stderr.strip().splitlines()[-1]} |")
                continue
            plan = json.loads(result.stdout)
            b, s, c, lo, n = (plan[k] for k in ("batch", "schedule", "cadence", "loader", "node"))
            rows.append(
                f"| {gpus} | {nodes} × {per_node} | {b['per_device_batch']:g} ({b['batch_duration']:.0f} s) | "
                f"{b['accumulate_grad_batches']} | {b['global_batch']:g} | {s['max_steps']:,} | {s['epochs']:g} | "
                f"{c['validate_every_steps']:,} ({c['validations']}) | {lo['shuffle_buffer']:,} / "
                f"{lo['bucket_buffer']:,} ({lo['memory_per_worker_gib']:.1f} GiB) | {n['cpu']} CPU, {n['memory']} "
                f"({n['shared_memory_gib']:.1f} shm) | {len(plan['warnings'])} | {wall:.0f} |"
            )
            print(rows[-1], file=sys.stderr)
    print("| GPUs | nodes × GPUs | per-device batch, utterances (batch_duration) | accumulate | global batch | "
          "steps | epochs | validate every (validations) | shuffle / bucket buffer (per worker) | node request | "
          "warnings | dry run, s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
