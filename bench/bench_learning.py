"""Learning-curve benchmark (not a test): tiny_ctc_char trained for a few budgets (steps × batch) on the two data
paths of habla train, WAV files (NeMo's classic loader) and tar shards (Lhotse, dynamic bucketing), side by
side, scored on the clips it trained on and on held-out clips.

    PYTHONPATH=. python bench/bench_learning.py [--budgets 150x8,300x8,600x8,150x16] [--rounds 3] [--json out.json]
    PYTHONPATH=. python bench/bench_learning.py --sampler     # batch_duration's calibration alone (no training)

Data: the bundled release data/mini-es-v25/es prepared twice by ``habla prepare`` with the same options,
``--format wav`` and ``--format tar`` (automatic shard count, shuffled shards): the same train clips either
way. Held out: its dev and test splits (other prompts of the same voice). Each budget trains once per path
per round, the paths alternating, one intra-op thread; WER/CER come from ``habla evaluate`` (greedy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from habla.data.options import PrepareOptions
from habla.data.prepare import prepare

RELEASE = REPO / "data" / "mini-es-v25" / "es"


def prepared(work: Path) -> dict:
    """Both data paths from one release, and the held-out manifest (dev + test)."""
    wav = prepare(str(RELEASE), str(work / "wav"), PrepareOptions(), workers=2)
    tar = prepare(str(RELEASE), str(work / "tar"), PrepareOptions(format="tar"), workers=2)
    held_out = work / "held_out.json"
    held_out.write_text("".join(Path(wav["manifests"][s]).read_text() for s in ("dev", "test")))
    return {
        "wav": {"train_manifest": wav["manifests"]["train"], "tars": None},
        "tar": {"train_manifest": tar["tarred"]["train"]["manifest_filepath"],
                "tars": tar["tarred"]["train"]["tarred_audio_filepaths"]},
        "seen": wav["manifests"]["train"],
        "held_out": str(held_out),
        "dev": wav["manifests"]["dev"],
        "tar_shards": tar["tarred"]["train"]["num_shards"],
        "train_clips": len(Path(wav["manifests"]["train"]).read_text().splitlines()),
    }  # fmt: skip


def run(data: dict, path: str, steps: int, batch: int, out: Path) -> dict:
    from habla.evaluation.evaluate import evaluate
    from habla.training.train import train

    overrides = [f"trainer.max_steps={steps}", f"model.train_ds.batch_size={batch}", f"global_batch={batch}",
                 "validate_every_steps=100000", "trainer.log_every_n_steps=100000"]  # fmt: skip
    started = time.monotonic()
    summary = train("tiny_ctc_char", data[path]["train_manifest"], data["dev"], str(out / "model"), overrides,
                    train_tars=data[path]["tars"])  # fmt: skip
    seconds = time.monotonic() - started
    seen = evaluate(str(out / "model" / "model.nemo"), data["seen"], str(out / "eval-seen"))
    held = evaluate(str(out / "model" / "model.nemo"), data["held_out"], str(out / "eval-held-out"))
    return {"path": path, "steps": summary["steps"], "batch": batch, "audio_hours": summary["audio_hours_seen"],
            "per_step": summary["batch"]["measured_global_batch"],
            "seen_wer": seen["wer"], "seen_cer": seen["cer"], "held_out_wer": held["wer"], "held_out_cer": held["cer"],
            "final_loss": summary["final_train_loss"], "seconds": round(seconds, 1)}  # fmt: skip


def sampler_table() -> None:
    """Utterances per batch from Lhotse's bucketing sampler: batch_size × mean padded clip as batch_duration (the
    first guess) vs the calibrated batch_duration, re-measured with another seed, on the bundled release's train
    durations and on 358,330 Common-Voice-like ones (log-normal around 4.8 s, 0.5-20 s)."""
    import random

    from habla.training import bucketing

    work = Path(tempfile.mkdtemp(prefix="habla-bench-sampler-"))
    wav = prepare(str(RELEASE), str(work / "wav"), PrepareOptions(), workers=2)
    bundled = [json.loads(line)["duration"] for line in Path(wav["manifests"]["train"]).read_text().splitlines()]
    rng = random.Random(1)
    cv_like = [min(20.0, max(0.5, rng.lognormvariate(1.5, 0.35))) for _ in range(358_330)]
    print("| durations | batch_size | batches drawn | buckets | first guess: utterances / batch | calibrated: "
          "utterances / batch (other seed) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, durations, batch, batches in (("bundled release train", bundled, 8, 300),
                                            ("Common-Voice-like", cv_like, 128, 175),
                                            ("Common-Voice-like", cv_like, 128, 1000)):  # fmt: skip
        durations = sorted(durations)
        bins = bucketing.bucket_bins(durations, bucketing.num_buckets(None, len(durations), batch))
        buffer = min(10_000, len(durations))
        guess = batch * bucketing.mean_padded(durations, bins)
        first = bucketing.simulated_batch(durations, bins, guess, batches, buffer)
        calibrated, _ = bucketing.calibrate_batch_duration(durations, bins, batch, batches, buffer)
        again = bucketing.simulated_batch(durations, bins, calibrated, batches, buffer, seed=7)  # another draw
        print(f"| {name} ({len(durations)} clips) | {batch} | {batches} | {len(bins) + 1} | {first:.1f} "
              f"({first / batch - 1:+.0%}) | {again:.1f} ({again / batch - 1:+.0%}) |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", default="150x8,300x8,600x8,150x16", help="comma-separated STEPSxBATCH")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the raw figures here")
    parser.add_argument("--sampler", action="store_true", help="only: batch_duration's calibration, no training")
    args = parser.parse_args()
    if args.sampler:
        sampler_table()
        return
    budgets = [tuple(int(v) for v in b.split("x")) for b in args.budgets.split(",")]

    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="habla-bench-learning-"))
    os.environ["HABLA_CACHE"] = str(work / "cache")
    data = prepared(work)
    rows = []
    for round_ in range(args.rounds):
        for steps, batch in budgets:
            for path in ("wav", "tar") if round_ % 2 == 0 else ("tar", "wav"):
                row = run(data, path, steps, batch, work / f"r{round_}-{path}-{steps}x{batch}")
                rows.append(row)
                print(json.dumps(row), flush=True)

    print(f"\n{data['train_clips']} train clips ({data['tar_shards']} tar shards); held out: dev + test; "
          f"median of {args.rounds} round(s)\n")  # fmt: skip
    print("| steps × batch | path | utterances / step | audio h seen | seen WER | seen CER | held-out WER | "
          "held-out CER | wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for steps, batch in budgets:
        for path in ("wav", "tar"):
            cell = [r for r in rows if (r["steps"], r["batch"], r["path"]) == (steps, batch, path)]
            med = {k: statistics.median(r[k] for r in cell) for k in cell[0] if k != "path"}
            scores = " | ".join(f"{med[k]:.3f}" for k in ("seen_wer", "seen_cer", "held_out_wer", "held_out_cer"))
            print(f"| {steps} × {batch} | {path} | {med['per_step']:.1f} | {med['audio_hours']:.2f} | {scores} | "
                  f"{med['seconds']:.0f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"data": data, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
