#!/usr/bin/env python3
"""Data-preparation benchmarks (not tests). Results and the command that made them: bench/RESULTS.md.

    .venv/bin/python bench/bench_prepare.py [--clips 1054] [--rows 1700000] [--rounds 3]
                                            [--only conversion,whole,workers,s3,scale]

* conversion: habla's in-process converter vs one ffmpeg process per clip (the original recipe), one sox
  process per clip (NeMo's script) and the MP3 decode alone (the floor), in audio-seconds per CPU-second,
  side by side on the same real-speech clips (Debian's Asterisk Spanish prompts re-encoded to 48/44.1/32 kHz
  MP3; needs apt-get, ffmpeg and sox with libsox-fmt-mp3);
* whole: the whole ``habla prepare`` command (a fresh process: imports, plan, conversion with 1 worker,
  manifests, report with its plot) vs one ffmpeg process per clip on the clips it accepted, rounds alternated;
* workers: ``convert_shard`` with 1 vs 2 worker processes (wall-clock throughput);
* s3: the same shard written as tar shards / per-file WAVs to a loopback S3 server (moto) vs a local folder;
* scale: planning and assembly of a synthetic release with ``--rows`` TSV rows (Common Voice 25.0 es has
  1.68 M clips), wall and CPU time and peak memory, each in a fresh process (``--rounds`` plans);
  ``--reference rows`` also plans it with the row-by-row planner the column planner must equal
  (``tests/data/plan_reference.py``), ``--reference REV`` with the planner of git revision REV (``git archive REV
  habla``), and compares the plan files byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "data"))
sys.path.insert(0, str(ROOT / "tests"))

from habla.core import jsonl, storage  # noqa: E402
from habla.core.layout import DatasetLayout  # noqa: E402
from habla.data import convert  # noqa: E402
from habla.data import prepare as prep  # noqa: E402
from habla.data.dataset import audio_name  # noqa: E402
from habla.data.options import PrepareOptions  # noqa: E402
from habla.speech import audio  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def build_corpus(work: Path, clips: int) -> Path:
    """A Common Voice-layout release of ``clips`` real-speech MP3s (prompts reused at other sample rates)."""
    from build_mini_release import V25_COLUMNS, encode_mp3, fetch_packages, read_prompts, write_tsv

    root = work / "corpus" / "es"
    (root / "clips").mkdir(parents=True)
    debs = Path(os.environ.get("HABLA_DEBS", "")) if os.environ.get("HABLA_DEBS") else None
    prompts = read_prompts(fetch_packages(debs, work))
    rng = random.Random(7)
    rows, durations = [], []
    for i in range(clips):
        _, sentence, wav = prompts[i % len(prompts)]
        rate = rng.choices([48_000, 44_100, 32_000], weights=[70, 15, 15])[0]
        name = f"common_voice_es_{i:08d}.mp3"
        data = encode_mp3(wav, rate, stereo=rng.random() < 0.1)
        (root / "clips" / name).write_bytes(data)
        info = sf.info(root / "clips" / name)
        durations.append(f"{name}\t{round(1000 * info.frames / info.samplerate)}")
        rows.append({"client_id": f"spk{i % 40}", "path": name, "sentence": "hola que tal", "locale": "es"})
    write_tsv(root / "train.tsv", V25_COLUMNS, rows)
    (root / "clip_durations.tsv").write_text("clip\tduration[ms]\n" + "\n".join(durations) + "\n")
    return root


def measure(label: str, fn, clips: list[Path]) -> dict:
    seconds = sum(sf.info(c).frames / sf.info(c).samplerate for c in clips)
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    fn(clips)
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    result = {
        "method": label,
        "clips": len(clips),
        "audio_s": round(seconds, 1),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "audio_s_per_cpu_s": round(seconds / cpu, 1),
    }
    print(json.dumps(result), flush=True)
    return result


def bench_conversion(corpus: Path, work: Path) -> list[dict]:
    clips = sorted((corpus / "clips").glob("*.mp3"))
    out = work / "wav"
    out.mkdir(exist_ok=True)

    def habla_convert(items):
        for c in items:
            (out / (c.stem + ".wav")).write_bytes(audio.convert(c.read_bytes()).wav)

    def decode_only(items):
        for c in items:
            audio.decode(c.read_bytes())

    def ffmpeg(items):
        for c in items:
            subprocess.run(
                [
                    "ffmpeg",
                    "-nostdin",
                    "-loglevel",
                    "error",
                    "-y",
                    "-i",
                    str(c),
                    "-ar",
                    "16000",
                    "-ac",
                    "1",
                    str(out / (c.stem + ".f.wav")),
                ],
                check=True,
            )

    def sox(items):
        for c in items:
            subprocess.run(
                ["sox", str(c), "-r", "16000", "-c", "1", "-b", "16", str(out / (c.stem + ".s.wav"))], check=True
            )

    results = [
        measure(name, fn, clips)
        for name, fn in (
            ("habla (in-process)", habla_convert),
            ("MP3 decode only (floor)", decode_only),
            ("ffmpeg per clip", ffmpeg),
            ("sox per clip", sox),
        )
    ]
    base = results[0]["audio_s_per_cpu_s"]
    for r in results:
        r["habla_vs_this"] = round(base / r["audio_s_per_cpu_s"], 2)
    return results


def _children_cpu() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child processes fn ran)."""
    wall0, cpu0 = time.perf_counter(), _children_cpu()
    fn()
    return time.perf_counter() - wall0, _children_cpu() - cpu0


def bench_whole(corpus: Path, work: Path, rounds: int) -> list[dict]:
    """``habla prepare`` from start to finish vs one ffmpeg process per accepted clip, alternated.

    Both sides run as fresh processes, so both pay their start-up: habla's imports, plan, 1 worker converting,
    the manifests and the report (report.json/.md/.png); ffmpeg's process per clip. Best round of each.
    """
    habla = str(Path(sys.executable).with_name("habla"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results, accepted = [], None
    for n in range(rounds):
        out = work / f"whole-{n}"
        command = [habla, "prepare", "--release", str(corpus), "--out", str(out), "--shards", "1", "--workers", "1",
                   "--splits", "train"]  # fmt: skip
        wall, cpu = _timed(lambda c=command: subprocess.run(c, check=True, capture_output=True, env=env))
        results.append(
            {"method": "habla prepare (whole run, 1 worker)", "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
        )
        print(json.dumps(results[-1]), flush=True)
        if accepted is None:
            entries = jsonl.loads((out / "manifests" / "train.json").read_text(encoding="utf-8"))
            accepted = [corpus / "clips" / e["path"] for e in entries]
        shutil.rmtree(out)
        ff = work / "whole-ffmpeg"
        ff.mkdir(exist_ok=True)

        def ffmpeg(ff=ff, accepted=accepted):
            for c in accepted:
                subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(c), "-ar", "16000", "-ac",
                                "1", str(ff / (c.stem + ".wav"))], check=True)  # fmt: skip

        wall, cpu = _timed(ffmpeg)
        results.append(
            {"method": "one ffmpeg process per accepted clip", "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
        )
        print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(ff)
    best = {
        m: {k: min(r[k] for r in results if r["method"] == m) for k in ("wall_s", "cpu_s")}
        for m in dict.fromkeys(r["method"] for r in results)
    }
    (habla_best, ffmpeg_best) = best.values()
    summary = {
        "accepted_clips": len(accepted),
        "wall_ratio": round(ffmpeg_best["wall_s"] / habla_best["wall_s"], 1),
        "cpu_ratio": round(ffmpeg_best["cpu_s"] / habla_best["cpu_s"], 1),
    }
    print(json.dumps(summary), flush=True)
    return results + [summary]


def bench_workers(corpus: Path, work: Path) -> list[dict]:
    results = []
    for workers in (1, 2, 1, 2):  # alternated, best of two each: the machine is shared
        out = work / f"workers-{workers}-{len(results)}"
        prep.plan(str(corpus), str(out), PrepareOptions(shards=1, splits=("train",)))
        start = time.perf_counter()
        stats = prep.convert_shard(str(out), 0, workers)
        wall = time.perf_counter() - start
        results.append(
            {
                "workers": workers,
                "wall_s": round(wall, 2),
                "audio_s": stats["audio_seconds"],
                "x_real_time": round(stats["audio_seconds"] / wall, 1),
            }
        )
        print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(out)
    best = {w: max(r["x_real_time"] for r in results if r["workers"] == w) for w in (1, 2)}
    return results + [{"speedup_2_vs_1": round(best[2] / best[1], 2)}]


def _process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def bench_s3(corpus: Path, work: Path) -> list[dict]:
    """One shard written to a local folder vs a loopback S3 server (moto), with 1 and 2 workers.

    The server runs on the same 2 cores: its own CPU time is reported, since with both cores converting it
    competes with the conversion (a real S3 endpoint or MinIO runs elsewhere).
    """
    from fixtures.commands import free_port

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    time.sleep(2)
    storage.s3_client().create_bucket(Bucket="bench")
    results = []
    try:
        for workers in (1, 2):
            for fmt in ("tar", "wav"):
                for target in ("local", "s3", "local", "s3"):
                    n = len(results)
                    out = str(work / f"s3b-{n}") if target == "local" else f"s3://bench/{fmt}-{n}"
                    prep.plan(str(corpus), out, PrepareOptions(shards=1, splits=("train",), format=fmt))
                    server_cpu = _process_cpu(server.pid)
                    start = time.perf_counter()
                    stats = prep.convert_shard(out, 0, workers)
                    wall = time.perf_counter() - start
                    results.append(
                        {
                            "workers": workers,
                            "format": fmt,
                            "target": target,
                            "wall_s": round(wall, 2),
                            "x_real_time": round(stats["audio_seconds"] / wall, 1),
                            "server_cpu_s": round(_process_cpu(server.pid) - server_cpu, 2),
                        }
                    )
                    print(json.dumps(results[-1]), flush=True)
    finally:
        server.terminate()
    summary = {}
    for workers in (1, 2):
        for fmt in ("tar", "wav"):
            best = {
                t: max(
                    r["x_real_time"] for r in results if (r["workers"], r["format"], r["target"]) == (workers, fmt, t)
                )
                for t in ("local", "s3")
            }
            summary[f"{fmt}_s3_vs_local_{workers}_workers"] = round(best["s3"] / best["local"], 2)
    return results + [summary]


SCALE_CHILD = r"""
import json, resource, sys, time
from habla.data import prepare as prep
from habla.data.options import PrepareOptions
step, release, out = sys.argv[1:4]
start = time.perf_counter()
if step == "plan":
    prep.plan(release, out, PrepareOptions(shards=int(sys.argv[4])))
else:
    prep.assemble(out)
usage = resource.getrusage(resource.RUSAGE_SELF)
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would count this benchmark's own process
peak_kb = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
print(json.dumps({"step": step, "wall_s": round(time.perf_counter() - start, 1),
                  "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_mb": round(peak_kb / 1024)}))
"""


def synthesize_release(root: Path, rows: int) -> None:
    """TSVs of a release the size of Common Voice 25.0 es (no audio): realistic ids, sentences, metadata."""
    rng = random.Random(1)
    words = (
        "el la de que y en un una por con para como más pero sus le ya o este sí porque esta entre "
        "cuando muy sin sobre también me hasta hay donde quien desde todo nos durante todos uno les ni "
        "contra otros ese eso ante ellos e esto mí antes algunos qué unos yo otro otras otra él tanto "
        "canción montaña río ciudad niño pingüino árbol corazón"
    ).split()
    speakers = [f"{rng.getrandbits(512):0128x}" for _ in range(100_000)]
    genders, ages = ["male_masculine", "female_feminine", ""], ["twenties", "thirties", "fourties", ""]
    accents = ["México", "Andino-Pacífico", "España: Norte peninsular", "Caribe", ""]
    (root / "clips").mkdir(parents=True)  # empty: planning reads no audio
    columns = (
        "client_id path sentence_id sentence sentence_domain up_votes down_votes age gender accents variant "
        "locale segment"
    )
    header = "\t".join(columns.split()) + "\n"
    durations = ["clip\tduration[ms]\n"]
    held_out = min(15_900, rows // 10)  # Common Voice 25.0 es: 15,900 dev and test rows each
    counts = {"train": rows - 2 * held_out, "dev": held_out, "test": held_out}
    n = 0
    for split, count in counts.items():
        with open(root / f"{split}.tsv", "w") as f:
            f.write(header)
            for _ in range(count):
                n += 1
                sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14))).capitalize() + "."
                name = f"common_voice_es_{n:09d}.mp3"
                f.write(
                    f"{rng.choice(speakers)}\t{name}\t{n:064x}\t{sentence}\t\t2\t0\t{rng.choice(ages)}\t"
                    f"{rng.choice(genders)}\t{rng.choice(accents)}\t\tes\t\n"
                )
                durations.append(f"{name}\t{rng.randint(1500, 9500)}\n")
    (root / "clip_durations.tsv").write_text("".join(durations))


def fake_convert(out: Path) -> None:
    """Shard files as convert_shard writes them, without audio (assembly reads only these)."""
    layout = DatasetLayout(str(out))
    plan = json.loads(storage.read_text(layout.plan))
    for k in range(plan["num_shards"]):
        entries: dict[str, list[dict]] = {}
        for clip in jsonl.loads(storage.read_text(layout.plan_shard(k))):
            record = convert._entry(clip, layout.wav(clip["split"], audio_name(clip)), clip["duration"])
            entries.setdefault(record["split"], []).append(record["entry"])
        for split, items in entries.items():
            items.sort(key=lambda e: e["path"])
            storage.write_text(layout.shard_file(k, f"{split}.jsonl"), jsonl.dumps(items))
        storage.write_text(layout.shard_file(k, "rejected.jsonl"), "")
        storage.write_text(
            layout.shard_result(k), json.dumps({"shard": k, "splits": {s: len(v) for s, v in entries.items()}})
        )


def reference_plan(work: Path, release: Path, out: Path, revision: str) -> dict:
    """Plan ``release`` with the habla of git ``revision`` (a fresh process that imports that copy: run from
    another folder, the editable install's finder comes after PYTHONPATH) and compare the plan files."""
    code = work / "reference"
    code.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "habla"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive.stdout, check=True)
    reference = work / "reference-out"
    command = [sys.executable, "-c", SCALE_CHILD, "plan", str(release), str(reference), "64"]
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, check=True, env=env)
    record = {**json.loads(done.stdout.splitlines()[-1]), "code": revision}

    def files(folder: Path) -> dict[str, bytes]:
        return {
            p.name: p.read_bytes()
            for p in sorted((folder / "plan").iterdir())
            if p.name not in ("plan.json", "claim.json")
        }

    mine, theirs = files(out), files(reference)
    record["identical_plan_files"] = mine == theirs
    record["files_compared"] = len(mine)
    record["differing"] = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))[:5]
    return record


ROWS_REFERENCE = r"""
import hashlib, json, sys
sys.path.insert(0, sys.argv[2])
import plan_reference
from habla.data import filters
from habla.data.options import PrepareOptions
options = PrepareOptions(shards=64)
digest = lambda files: {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
columns = digest(plan_reference.columns_files(filters.build_plan(sys.argv[1], options)))
rows = digest(plan_reference.build_plan(sys.argv[1], options).files())
print(json.dumps({"code": "rows (tests/data/plan_reference.py)", "identical_plan_files": columns == rows,
                  "files_compared": len(rows), "differing": sorted(k for k in rows if rows[k] != columns.get(k))[:5]}))
"""


def rows_reference(release: Path) -> dict:
    """Compare the column planner's files with the row-by-row reference planner's, on ``release`` (in memory, in
    a fresh process: the reference holds every row as an object)."""
    command = [sys.executable, "-c", ROWS_REFERENCE, str(release), str(ROOT / "tests" / "data")]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def bench_scale(work: Path, rows: int, reference: str | None = None, rounds: int = 1) -> list[dict]:
    release, out = work / "synthetic" / "es", work / "synthetic-out"
    start = time.perf_counter()
    synthesize_release(release, rows)
    print(f"synthesized {rows} rows in {time.perf_counter() - start:.0f}s", flush=True)
    results = []
    run = lambda *a: json.loads(
        subprocess.run(
            [sys.executable, "-c", SCALE_CHILD, *map(str, a)],  # noqa: E731
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()[-1]
    )
    for _ in range(rounds):
        shutil.rmtree(out, ignore_errors=True)
        results.append(run("plan", release, out, 64))
        print(json.dumps(results[-1]), flush=True)
    if reference == "rows":
        results.append(rows_reference(release))
        print(json.dumps(results[-1]), flush=True)
    elif reference:
        results.append(reference_plan(work, release, out, reference))
        print(json.dumps(results[-1]), flush=True)
    fake_convert(out)
    results.append(run("assemble", release, out))
    print(json.dumps(results[-1]), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=1054)
    parser.add_argument("--rows", type=int, default=1_700_000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the whole-run comparison and of scale's plan")
    parser.add_argument("--corpus", type=Path, help="reuse a corpus folder built before (its es/ folder)")
    parser.add_argument("--only", default="conversion,whole,workers,s3,scale")
    parser.add_argument(
        "--reference",
        help="scale: also plan with the row-by-row reference ('rows') or this git revision's habla, "
        "and compare the plan files",
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    results = {}
    with tempfile.TemporaryDirectory(prefix="habla-bench-") as tmp:
        work = Path(tmp)
        if only & {"conversion", "whole", "workers", "s3"}:
            corpus = args.corpus or build_corpus(work, args.clips)
        if "conversion" in only:
            results["conversion"] = bench_conversion(corpus, work)
        if "whole" in only:
            results["whole"] = bench_whole(corpus, work, args.rounds)
        if "workers" in only:
            results["workers"] = bench_workers(corpus, work)
        if "s3" in only:
            results["s3"] = bench_s3(corpus, work)
        if "scale" in only:
            results["scale"] = bench_scale(work, args.rows, args.reference, args.rounds)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
