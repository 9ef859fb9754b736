"""Transcription benchmark (not a test): habla's windowed CTC transcription against NeMo's own
``model.transcribe()``, side by side in one run, and a 10-minute recording in windows against one forward pass.

    PYTHONPATH=. python bench/bench_transcribe.py --model MODEL.nemo [--rounds 3]

MODEL: any CTC .nemo (e.g. the demo's ``runs/demo/models/<run>/model.nemo``). Clips: every clip of the
bundled release (data/mini-es-v25/es) that ``habla prepare --train-source validated`` keeps. The 10-minute
file: those clips end to end with 0.5 s pauses, as FLAC. Throughput is audio seconds per wall second (RTFx);
rounds alternate the variants (the machine is shared) and the median is reported. Peak memory of the
10-minute file is measured in a fresh process per variant (``VmHWM``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from habla.data.options import PrepareOptions
from habla.data.prepare import prepare
from habla.evaluation import transcribe as tr
from habla.evaluation.inputs import AudioInput
from habla.evaluation.runners import CtcRunner, load_model
from habla.evaluation.windows import CONTEXT_S, WINDOW_S

RELEASE = REPO / "data" / "mini-es-v25" / "es"

PEAK = """
import sys
sys.path.insert(0, {repo!r})
from habla.evaluation import transcribe as tr
from habla.evaluation.inputs import AudioInput
from habla.evaluation.runners import CtcRunner, load_model
def peak_kb():  # VmHWM: ru_maxrss survives exec and would count the benchmark's own process
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
runner = CtcRunner(load_model({model!r}, "cpu"))
before = peak_kb()
list(tr.transcribe_inputs(runner, [AudioInput({audio!r})], 8, window_s={window}, context_s={context}))
print(before, peak_kb())
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import numpy as np
    import soundfile as sf
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="habla-bench-transcribe-"))
    prepare(str(RELEASE), str(work / "data"), PrepareOptions(shards=1, train_source="validated"), workers=2)
    entries = [json.loads(line) for split in ("train", "dev", "test")
               for line in (work / "data" / "manifests" / f"{split}.json").read_text().splitlines()]  # fmt: skip
    paths = [e["audio_filepath"] for e in entries]
    seconds = sum(e["duration"] for e in entries)

    from nemo.collections.asr.models import ASRModel

    nemo = ASRModel.restore_from(args.model, map_location="cpu")
    runner = CtcRunner(load_model(args.model, "cpu"))
    timings: dict[str, list[float]] = {"NeMo model.transcribe (batch 8)": [], "habla transcribe_inputs (batch 8)": []}
    for _ in range(args.rounds):
        started = time.perf_counter()
        expected = [h.text for h in nemo.transcribe(paths, batch_size=8, verbose=False)]
        timings["NeMo model.transcribe (batch 8)"].append(time.perf_counter() - started)
        started = time.perf_counter()
        got = [t.text for _, t in tr.transcribe_inputs(runner, [AudioInput(p) for p in paths], 8)]
        timings["habla transcribe_inputs (batch 8)"].append(time.perf_counter() - started)
    same = sum(a == b for a, b in zip(expected, got))
    print(f"{len(paths)} clips, {seconds:.0f} s of audio; identical transcripts: {same}")
    for name, values in timings.items():
        print(f"| {name} | {seconds / statistics.median(values):.0f} |")

    clips = [sf.read(p, dtype="float32")[0] for p in paths]
    pause = np.zeros(8000, dtype=np.float32)
    pieces = []
    while sum(map(len, pieces)) < 600 * 16000:
        for clip in clips:
            pieces += [clip, pause]
    long = work / "long.flac"
    sf.write(long, np.concatenate(pieces)[: 600 * 16000], 16000)
    for label, window, context in (("windows of 20 s + 2 x 4 s", WINDOW_S, CONTEXT_S), ("one window", 1e6, 0.0)):
        code = PEAK.format(repo=str(REPO), model=args.model, audio=str(long), window=window, context=context)
        runs = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            runs.append((time.perf_counter() - started, *map(int, out.stdout.split()[-2:])))
        wall = statistics.median(r[0] for r in runs)
        growth = statistics.median((r[2] - r[1]) / 1024 for r in runs)
        print(f"| 10-minute FLAC, {label} | {wall:.1f} s (incl. model load) | +{growth:.0f} MB peak RSS |")


if __name__ == "__main__":
    main()
