"""Step 2 of ``habla prepare``: convert the clips of one shard with W worker processes (in-process MP3 decode,
down-mix, soxr resample, PCM_16) and write the audio plus ``shards/shard-<k>.json``. Shards are independent:
on a cluster each is one KFP ParallelFor task. A killed shard resumes; a converted one is not touched again.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

from habla.core import jsonl, leftovers, state, storage, untrusted
from habla.core.errors import HablaError
from habla.core.layout import DatasetLayout
from habla.core.progress import Progress
from habla.data import bundles, commonvoice
from habla.data.dataset import audio_name, duration_problem, read_plan, rejection_order, scratch_folder, shard_result
from habla.data.options import MIN_CLIP_SECONDS, TEST_MAX_SECONDS, PrepareOptions
from habla.speech import audio

log = logging.getLogger("habla.prepare")


#: Clips a worker is handed at once; from object storage, read this many at a time (request latency overlaps).
BATCH = 32


@dataclass(frozen=True)
class _Task:
    clip: dict
    # where its bytes are: a file or object (a release folder), a member of the shard's bundle, or why the archive
    # held none ([reason, detail], or None: not in it)
    source: str | bundles.Member | list[str] | None
    target: str | None  # WAV destination; None: return the WAV bytes (tar shards are written by the parent)
    resume: bool


def _read(source: str | bundles.Member) -> bytes:
    if isinstance(source, bundles.Member):
        return source.read()
    return untrusted.read_capped(source, audio.MAX_CLIP_BYTES)


@functools.cache
def _fetchers(pid: int) -> ThreadPoolExecutor:  # noqa: ARG001 - per process: threads do not cross fork()
    return ThreadPoolExecutor(max_workers=BATCH, thread_name_prefix="habla-fetch")


def _fetched(tasks: list[_Task]) -> dict[int, tuple[bytes | None, Exception | None]]:
    """The bytes of the tasks' clips in object storage, read concurrently: (bytes, or the error reading gave)."""
    wanted = [i for i, t in enumerate(tasks) if isinstance(t.source, str) and storage.is_s3(t.source)
              and not (t.resume and t.target)]  # fmt: skip
    if len(wanted) < 2:
        return {}

    def fetch(i: int) -> tuple[bytes | None, Exception | None]:
        try:
            return _read(tasks[i].source), None
        except Exception as exc:  # noqa: BLE001 - handed to _convert_one, which decides what it means
            return None, exc

    return dict(zip(wanted, _fetchers(os.getpid()).map(fetch, wanted)))


def _convert_batch(args: tuple[list[_Task], PrepareOptions]) -> list[tuple[dict, bytes | None]]:
    """Convert a batch; its WAVs bound for object storage are written in the background while the next clips
    convert (a PUT's latency overlaps the decoding), all of them before the batch's records are returned."""
    tasks, options = args
    fetched = _fetched(tasks)
    writes: list = []
    records = [_convert_one(task, options, fetched.get(i), writes) for i, task in enumerate(tasks)]
    for write in writes:
        write.result()  # a failed write fails the batch: nothing is recorded for a WAV that is not there
    return records


def _convert_one(
    task: _Task,
    options: PrepareOptions,
    fetched: tuple[bytes | None, Exception | None] | None = None,
    writes: list | None = None,
) -> tuple[dict, bytes | None]:
    """Convert one clip. Returns (manifest entry or rejection dict, WAV bytes for tar shards). ``writes``: where
    a WAV written to object storage in the background puts its future (else it is written before returning)."""
    clip = task.clip

    def rejected(reason: str, detail: str = "") -> tuple[dict, None]:
        return {
            "rejected": True,
            "split": clip["split"],
            "path": clip["path"],
            "reason": reason,
            "detail": detail,
            "line": clip["line"],
        }, None

    if task.resume and task.target and storage.exists(task.target):
        # Written atomically by an earlier attempt, after passing every filter: only its duration is needed.
        duration = audio.wav_duration(storage.read_bytes(task.target, byte_range=(0, 4095)))
        return _entry(clip, task.target, duration), None
    if task.source is None or isinstance(task.source, list):  # an archive's clip that no bundle holds
        return rejected(*(task.source or ["missing_clip", "no such file in clips/"]))
    try:
        if fetched is None:
            data = _read(task.source)
        elif fetched[1] is not None:
            raise fetched[1]
        else:
            data = fetched[0]
    except FileNotFoundError:
        return rejected("missing_clip", "no such file in clips/")
    except untrusted.NotAFile as exc:
        return rejected("not_a_file", str(exc))
    except untrusted.TooLarge as exc:
        return rejected("too_large", str(exc))
    except PermissionError:
        return rejected("unreadable_clip", "permission denied")
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return rejected("name_too_long", "the file system refuses the name")
        raise  # a storage fault (I/O error, full disk): the run stops, nothing is recorded as bad data
    test = clip["split"] == "test"  # every decodable test clip is kept (see habla.data.filters)
    try:
        decoded = audio.load(data, clip["duration"], TEST_MAX_SECONDS if test else options.max_duration)
    except audio.AudioRejected as exc:
        return rejected(exc.reason, exc.detail)
    problem = duration_problem(decoded.duration, clip["text"], options) or audio.silence_problem(decoded)
    if problem and (not test or decoded.duration < MIN_CLIP_SECONDS):
        return rejected(*problem)
    if problem and not clip.get("training_filter"):
        clip = {**clip, "training_filter": problem[0]}
    wav = audio.encode_wav(decoded.mono)
    if task.target is None:
        return _entry(clip, None, decoded.duration), wav
    if writes is not None and storage.is_s3(task.target):
        writes.append(_fetchers(os.getpid()).submit(storage.write_bytes, task.target, wav))
    else:
        storage.write_bytes(task.target, wav)
    return _entry(clip, task.target, decoded.duration), None


def _entry(clip: dict, target: str | None, duration: float) -> dict:
    entry = {
        "audio_filepath": storage.absolute(target) if target else audio_name(clip),
        "duration": round(duration, 4),
        "text": clip["text"],
        "sentence": clip["sentence"],
        "path": clip["path"],
    }
    entry.update({k: clip[k] for k in commonvoice.METADATA_COLUMNS})
    if clip.get("training_filter"):  # a test clip the training filters would have dropped (scored all the same)
        entry["training_filter"] = clip["training_filter"]
    return {"split": clip["split"], "entry": entry}


def _deterministic_tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    return info


def convert_shard(out: str, shard: int, workers: int | None = None) -> dict:
    """Step 2: convert the clips of one shard. Returns the shard's result (also written to ``shards/``).

    A complete shard is skipped. A shard that was started before (and killed) resumes: WAVs already
    written are kept, not converted again. Tar shards are published whole (a temporary file renamed, or a
    multipart upload completed), so a killed tar shard is rebuilt.
    """
    layout = DatasetLayout(out)
    result_uri = layout.shard_result(shard)
    done = shard_result(out, shard)
    if done is not None:
        log.info("shard %d: already converted", shard)
        return done
    summary = read_plan(out)
    if not 0 <= shard < summary["num_shards"]:
        raise HablaError(f"shard {shard} does not exist (the plan has {summary['num_shards']} shards)")
    options = PrepareOptions.from_json(summary["options"])
    workers = workers or os.cpu_count() or 1
    clips = jsonl.loads(storage.read_text(layout.plan_shard(shard)))
    started_marker = layout.shard_started(shard)
    tarred = set(summary["tar_shards"])
    resume = storage.exists(started_marker)
    if resume:  # killed before: drop what its writers left half-written
        for split in {c["split"] for c in clips}:
            leftovers.remove_stale_parts(storage.join(out, "tarred" if split in tarred else "audio", split))
        leftovers.remove_stale_parts(storage.join(out, "shards"))
    else:
        storage.write_text(started_marker, "")
    bundled = summary.get("clip_source") == "bundles"  # an archive's clips, bundled per shard when planned

    started = time.monotonic()
    cpu_started = time.process_time()
    entries: dict[str, list[dict]] = {}
    rejected: list[dict] = []
    with contextlib.ExitStack() as stack, Progress(len(clips), f"shard {shard}") as progress:
        held = None
        if bundled:
            scratch = stack.enter_context(scratch_folder())
            held = stack.enter_context(bundles.open_shard(summary["root"], shard, scratch))
        tasks = [
            _Task(
                clip,
                _source(clip["path"], summary["root"], held),
                None if clip["split"] in tarred else layout.wav(clip["split"], audio_name(clip)),
                resume,
            )
            for clip in clips
        ]
        # Tar shards are written as the clips arrive (in plan order: by path for dev/test, shuffled for train)
        # and uploaded while the conversion goes on; they are published only if the whole shard succeeds.
        writers = {
            split: stack.enter_context(storage.AtomicWriter(layout.tar(split, shard)))
            for split, count in summary["tar_shards"].items()
            if shard < count
        }
        # PAX: member names of any length and any Unicode (ustar stops at 100 bytes of ASCII-safe name)
        tars = {split: tarfile.open(fileobj=w, mode="w|", format=tarfile.PAX_FORMAT) for split, w in writers.items()}
        batches = [(tasks[k : k + BATCH], options) for k in range(0, len(tasks), BATCH)]
        for records in _map(_convert_batch, batches, workers):
            for record, wav in records:
                if record.get("rejected"):
                    record.pop("rejected")
                    rejected.append(record)
                    progress.update(1)
                    continue
                progress.update(1, record["entry"]["duration"])
                entry = record["entry"]
                if wav is not None:
                    entry["shard_id"] = shard
                    tars[record["split"]].addfile(
                        _deterministic_tarinfo(entry["audio_filepath"], len(wav)), fileobj=_BytesReader(wav)
                    )
                entries.setdefault(record["split"], []).append(entry)
        for tar in tars.values():
            tar.close()
        # What the shard writes, at once (each object's request latency overlaps the others'): its tars, their
        # manifests (members in tar order), its manifest lines per split and its rejections, each sorted so
        # that assembly can merge the shards as streams. The summary is written last: the shard is complete.
        outputs: list[tuple] = [(w.commit,) for w in writers.values()]
        outputs += [(storage.write_text, layout.tar_manifest(split, shard), jsonl.dumps(entries.get(split, [])))
                    for split in tars]  # fmt: skip
        for split_entries in entries.values():
            split_entries.sort(key=lambda e: e["path"])
        outputs += [(storage.write_text, layout.shard_file(shard, f"{split}.jsonl"), jsonl.dumps(split_entries))
                    for split, split_entries in entries.items()]  # fmt: skip
        rejected.sort(key=rejection_order)
        outputs.append((storage.write_text, layout.shard_file(shard, "rejected.jsonl"), jsonl.dumps(rejected)))
        with ThreadPoolExecutor(max_workers=len(outputs), thread_name_prefix="habla-publish") as pool:
            for done in [pool.submit(*output) for output in outputs]:
                done.result()

    result = {
        "shard": shard,
        "splits": {split: len(split_entries) for split, split_entries in sorted(entries.items())},
        "rejected": len(rejected),
        "audio_seconds": round(sum(e["duration"] for es in entries.values() for e in es), 3),
        "wall_seconds": round(time.monotonic() - started, 3),
        "parent_cpu_seconds": round(time.process_time() - cpu_started, 3),
        "workers": workers,
    }
    state.write(result_uri, result, indent=None)
    storage.delete(started_marker)
    return result


def _source(path: str, root: str, held: bundles.ShardClips | None) -> str | bundles.Member | list[str] | None:
    """Where a clip's bytes are: ``root/clips/<path>``, or its shard's bundle (None: the archive held none)."""
    if held is None:
        return storage.join(root, "clips", path)
    return held.members.get(path) or held.skipped.get(path)


def _map(fn, items: list, workers: int) -> Iterator:
    """Map in order over a process pool; in-process when one worker suffices (no fork cost)."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(
        max_workers=min(workers, len(items)), initializer=_die_with, initargs=(os.getpid(),)
    ) as pool:
        yield from pool.map(fn, items)


def _die_with(parent: int) -> None:
    """Make a worker process exit when its parent is killed (SIGKILL, the OOM killer) instead of waiting for
    work for ever: every worker holds the task pipe open, so none would see it close. Linux only."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class _BytesReader:
    """Minimal file object over bytes for tarfile.addfile (avoids copying into a BytesIO)."""

    def __init__(self, data: bytes) -> None:
        self._view, self._pos = memoryview(data), 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else self._pos + size
        chunk = self._view[self._pos : end].tobytes()
        self._pos += len(chunk)
        return chunk
