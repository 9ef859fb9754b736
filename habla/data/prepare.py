"""``habla prepare``: a Common Voice release → 16 kHz WAV (or NeMo tar shards) + NeMo manifests + a report.

Three steps, each a plain function the KFP components call too:

1. :func:`plan` reads the TSVs, normalizes the text, applies the row filters (malformed rows, unsafe paths,
   text, duplicates, leakage, durations when the release has a duration table) and splits the remaining
   clips into N shards balanced by duration. Writes ``plan/``.
2. :func:`convert_shard` converts the clips of one shard with W worker processes (in-process MP3 decode,
   down-mix, soxr resample, PCM_16) and writes the audio plus ``shards/shard-<k>.json``. Shards are
   independent: on a cluster each is one KFP ParallelFor task.
3. :func:`assemble` gathers the shard results into ``manifests/<split>.json``, ``rejected.jsonl`` and the
   dataset report, and checks that every input row ended up in exactly one of them.

Every file is written atomically and every step skips work that is already complete, so a re-run rewrites
nothing and a killed run, started again, ends exactly as an uninterrupted one. The first run binds ``<out>``
to its release and options (``plan/claim.json``, a conditional create: local or S3): a concurrent run with
the same ones cooperates, one with others is refused. See docs/layout.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import heapq
import json
import logging
import math
import os
import random
import shutil
import socket
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from habla.core import jsonl, storage
from habla.core.errors import HablaError
from habla.core.layout import DatasetLayout
from habla.core.progress import Progress
from habla.data import audio, commonvoice
from habla.data.options import MAX_SHARDS, MIN_CLIP_SECONDS, PrepareOptions
from habla.data.text import TextRejected, normalize_text

log = logging.getLogger("habla.prepare")

EVAL_SPLITS = ("dev", "test")
PLAN_VERSION = 2
NAME_MAX = commonvoice.NAME_MAX
# Weight of a clip when the release has no duration table (planning then balances clip counts).
DEFAULT_CLIP_SECONDS = 5.0
# Automatic shard count (shard_count): audio per shard, and data-loader workers per training rank (the GPU
# training configs' model.train_ds.num_workers).
HOURS_PER_SHARD = 20.0
LOADER_WORKERS = 8


@dataclass(slots=True)
class Clip:
    """A row of a TSV that passed the row filters; becomes a manifest line unless its audio is bad."""

    split: str
    path: str  # the clip's file name as in the TSV (checked: a plain name inside clips/)
    text: str  # normalized
    sentence: str  # as in the TSV
    client_id: str
    gender: str
    age: str
    accents: str
    locale: str
    line: int
    duration: float | None = None  # from the release's duration table; None: measured when decoding
    audio: str = ""  # the WAV (or tar member) name when not the default one: see audio_name, _name_audio


@dataclass(slots=True)
class Rejection:
    split: str
    path: str
    reason: str
    detail: str = ""
    line: int = 0


@dataclass
class Plan:
    """What plan() decided; serialized under ``<out>/plan/``."""

    release: str  # the release location given by the user
    root: str  # the locale folder the clips are read from (staged, for an archive)
    options: PrepareOptions
    rows_read: dict[str, int]  # data rows per TSV read (the accounting base)
    tsv_of_split: dict[str, str]
    has_durations: bool
    shards: list[list[Clip]] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # the files read, relative to root


is_safe_clip_name = commonvoice.is_safe_clip_name


# ------------------------------------------------------------------------------------------------- plan


def build_plan(release: str, root: str, options: PrepareOptions, skipped: dict | None = None) -> Plan:
    """Read the TSVs and decide, row by row, what becomes a clip and what is rejected (no audio is read).

    ``skipped``: clip name -> (reason, detail) of clips an archive held but that were not unpacked.
    """
    tsv_of_split = {
        s: "validated" if s == "train" and options.train_source == "validated" else s for s in options.splits
    }
    durations = commonvoice.read_durations(root)
    plan = Plan(release, root, options, {}, tsv_of_split, durations is not None)
    # the duration table read (clip_durations.tsv, or times.txt in 14.0-style releases) is an input too
    plan.inputs = (
        [f for f in commonvoice.DURATION_FILES if storage.exists(storage.join(root, f))][:1]
        if durations is not None
        else []
    )
    skipped = skipped or {}

    # Dev/test rows guard the train split even when they are not prepared themselves, and dev guards test.
    eval_paths: dict[str, set[str]] = {}
    eval_speakers: set[str] = set()
    eval_texts: set[str] = set()
    guarded = _guarded_splits(options)
    for split in EVAL_SPLITS:
        uri = storage.join(root, f"{split}.tsv")
        if split not in guarded or (split not in options.splits and not storage.exists(uri)):
            continue
        plan.inputs.append(f"{split}.tsv")
        eval_paths[split] = set()
        for row in _read_rows(uri):
            if isinstance(row, commonvoice.TsvRow):
                eval_paths[split].add(row.fields["path"])
                eval_speakers.add(row.fields["client_id"])
                try:
                    eval_texts.add(normalize_text(row.fields["sentence"]))
                except TextRejected:
                    pass
    overlap = {
        "train": ("dev/test", eval_paths.get("dev", set()) | eval_paths.get("test", set())),
        "test": ("dev", eval_paths.get("dev", set())),
    }

    clips_by_split: dict[str, list[Clip]] = {}
    for split in options.splits:
        tsv = tsv_of_split[split]
        uri = storage.join(root, f"{tsv}.tsv")
        if f"{tsv}.tsv" not in plan.inputs:
            plan.inputs.append(f"{tsv}.tsv")
        seen: set[str] = set()
        clips: list[Clip] = []
        rows = 0
        for row in _read_rows(uri):
            rows += 1
            if isinstance(row, commonvoice.MalformedRow):
                plan.rejected.append(Rejection(split, row.path, "malformed_row", row.detail, row.line))
                continue
            clip, rejection = _check_row(
                split, row, seen, overlap.get(split), eval_speakers, eval_texts, durations, skipped, options
            )
            if rejection:
                plan.rejected.append(rejection)
            else:
                clips.append(clip)
        plan.rows_read[f"{tsv}.tsv" if tsv == split else f"{tsv}.tsv (as {split})"] = rows
        _name_audio(clips)
        clips_by_split[split] = clips

    count = shard_count(clips_by_split, options)
    tarred = {"train"} & set(clips_by_split) if options.format == "tar" else set()
    plan.shards = _balance({s: c for s, c in clips_by_split.items() if s not in tarred}, count)
    for split in tarred:
        for shard, dealt in zip(plan.shards, deal_tar_shards(clips_by_split[split], count, options.shard_seed)):
            shard.extend(dealt)
    return plan


def _read_rows(uri: str) -> Iterator[commonvoice.TsvRow | commonvoice.MalformedRow]:
    try:
        _, rows = commonvoice.read_tsv(uri)
    except FileNotFoundError:
        raise HablaError(f"{uri}: no such TSV in the release") from None
    return rows


def _check_row(
    split: str,
    row: commonvoice.TsvRow,
    seen: set[str],
    overlap: tuple[str, set[str]] | None,
    eval_speakers: set[str],
    eval_texts: set[str],
    durations: dict[str, float] | None,
    skipped: dict[str, list[str]],
    options: PrepareOptions,
) -> tuple[Clip | None, Rejection | None]:
    """Apply the row filters in a fixed order; the first that fails names the reason."""
    f = row.fields
    path, sentence = f["path"], f["sentence"]

    def reject(reason: str, detail: str = "") -> tuple[None, Rejection]:
        return None, Rejection(split, path, reason, detail, row.line)

    if not is_safe_clip_name(path):
        return reject("unsafe_path", "clip path must be a plain, printable file name inside clips/")
    if len(path) > NAME_MAX // 4 and commonvoice.name_too_long(path):  # 4 bytes at most per character
        return reject("name_too_long", f"clip name over {commonvoice.NAME_MAX} bytes")
    if "\ufffd" in sentence:
        return reject("undecodable_text", "sentence is not valid UTF-8")
    try:
        text = normalize_text(sentence)
    except TextRejected as exc:
        return reject(exc.reason, exc.detail)
    if path in seen:
        return reject("duplicate", "clip listed more than once in this TSV")
    seen.add(path)
    if overlap is not None and path in overlap[1]:
        return reject("eval_overlap", f"clip also listed in {overlap[0]}")
    if split == "train" and options.train_source == "validated":
        if f["client_id"] in eval_speakers:
            return reject("eval_speaker", "speaker also in dev/test")
        if text in eval_texts:
            return reject("eval_sentence", "sentence also in dev/test")
    if path in skipped:
        return reject(*skipped[path])
    duration = durations.get(path) if durations is not None else None
    if duration is not None:
        reason = duration_problem(duration, text, options)
        if reason:
            return reject(*reason)
    return (
        Clip(
            split,
            path,
            text,
            sentence,
            f["client_id"],
            f.get("gender", ""),
            f.get("age", ""),
            f.get("accents", ""),
            f.get("locale", ""),
            row.line,
            duration,
        ),
        None,
    )


def audio_name(clip: dict | Clip) -> str:
    """The WAV (or tar member) name of a planned clip: ``x.mp3`` -> ``x.wav`` unless the plan chose another."""
    audio, path = (clip["audio"], clip["path"]) if isinstance(clip, dict) else (clip.audio, clip.path)
    if audio:
        return audio
    head, dot, _ = path.rpartition(".")
    return f"{head if dot and head else path}.wav"


def _plain(path: str) -> bool:
    """A Common Voice style name (``common_voice_es_123.mp3``): two such names never share a WAV name."""
    return path.endswith(".mp3") and path.isascii() and path.islower()


def _name_audio(clips: list[Clip]) -> None:
    """Give every clip of a split its own WAV name (``Clip.audio``; "" means :func:`audio_name`'s default).

    ``<stem>.wav`` unless another clip of the split already has that name (``x.mp3`` and ``x.wav``; names that
    differ only in case, for case-insensitive disks) or it would exceed the file-name limit; then
    ``<stem, cut>.<hash of the clip name>.wav``. Deterministic. Lower-case ASCII ``.mp3`` names (every Common
    Voice clip) keep their default and cost nothing: only the other names are checked, against them.
    """
    odd = [c for c in clips if not _plain(c.path)]
    if not odd:
        return
    plain = {c.path for c in clips if _plain(c.path)}

    def taken_by_plain(key: str) -> bool:
        return key.endswith(".wav") and f"{key[:-4]}.mp3" in plain

    taken: set[str] = set()
    for clip in sorted(odd, key=lambda c: c.path):
        name = audio_name(clip)
        if name.casefold() in taken or taken_by_plain(name.casefold()) or commonvoice.name_too_long(name):
            stem = name[: -len(".wav")]
            short = stem.encode("utf-8")[:200].decode("utf-8", "ignore")
            digest = hashlib.sha256(clip.path.encode("utf-8")).hexdigest()
            n = 12
            name = f"{short}.{digest[:n]}.wav"
            while name.casefold() in taken or taken_by_plain(name.casefold()):  # only for names made to collide
                n += 1
                name = f"{short}.{digest[:n]}.wav"
        taken.add(name.casefold())
        clip.audio = name


def duration_problem(duration: float, text: str, options: PrepareOptions) -> tuple[str, str] | None:
    """The duration and speaking-rate filters, shared by planning (duration table) and conversion (decoded).

    Below :data:`MIN_CLIP_SECONDS` a clip is too short whatever ``--min-duration`` says.
    """
    shortest = max(options.min_duration, MIN_CLIP_SECONDS)
    if duration < shortest:
        return "too_short", f"{duration:.3f}s < {shortest}s"
    if duration > options.max_duration:
        return "too_long", f"{duration:.2f}s > {options.max_duration}s"
    rate = len(text) / duration
    if not options.min_chars_per_second <= rate <= options.max_chars_per_second:
        return "chars_per_second", f"{rate:.1f} chars/s"
    return None


def _balance(clips_by_split: dict[str, list[Clip]], shards: int) -> list[list[Clip]]:
    """Spread each split over the shards, longest clip first onto the lightest shard (deterministic).

    Every split is spread over ``min(shards, len(clips))`` shards, so shard k holds about 1/N of every split:
    shards take about the same time, and the tar shards of a split are numbered 0..m-1 without gaps.
    """
    out: list[list[Clip]] = [[] for _ in range(shards)]
    for split in sorted(clips_by_split):
        clips = clips_by_split[split]
        count = min(shards, len(clips))
        heap = [(0.0, k) for k in range(count)]
        for clip in sorted(clips, key=lambda c: (-(c.duration or DEFAULT_CLIP_SECONDS), c.path)):
            load, k = heapq.heappop(heap)
            out[k].append(clip)
            heapq.heappush(heap, (load + (clip.duration or DEFAULT_CLIP_SECONDS), k))
    for shard in out:
        shard.sort(key=lambda c: (c.split, c.path))
    return out


def shard_count(clips_by_split: dict[str, list[Clip]], options: PrepareOptions) -> int:
    """``--shards`` when given. Else one shard per HOURS_PER_SHARD hours of audio (a conversion task of a few
    minutes), and with ``--format tar`` rounded up to a multiple of world size × LOADER_WORKERS: every loader
    worker of every rank then streams a shard of its own (NeMo's tarred loaders want that multiple)."""
    if options.shards is not None:
        return options.shards
    seconds = sum(c.duration or DEFAULT_CLIP_SECONDS for clips in clips_by_split.values() for c in clips)
    count = max(1, math.ceil(seconds / 3600 / HOURS_PER_SHARD))
    if options.format == "tar":
        readers = options.world_size * LOADER_WORKERS
        count = math.ceil(count / readers) * readers
        if count > MAX_SHARDS:
            raise HablaError(
                f"--world-size {options.world_size} × {LOADER_WORKERS} loader workers needs {count} tar shards, over "
                f"the {MAX_SHARDS} allowed: give --shards"
            )
    return count


def deal_tar_shards(clips: list[Clip], shards: int, seed: int) -> list[list[Clip]]:
    """The train split's tar shards: its clips in a seeded random order, dealt round-robin over
    ``min(shards, len(clips))`` shards (sizes differ by one clip at most). Each shard, written in that order,
    is a random sample of the whole split: no recording session or path range clusters in a shard, so batches
    streamed from any shard are mixed without relying on the loader's shuffle buffer."""
    order = sorted(clips, key=lambda c: c.path)  # the same input order whatever the TSV order
    random.Random(seed).shuffle(order)
    count = min(shards, len(order))
    return [order[k::count] for k in range(count)] + [[] for _ in range(shards - count)]


def _jsonl(records: Iterable) -> str:
    """JSON lines of flat dataclass records (dataclasses.asdict deep-copies: too slow for millions)."""
    records = list(records)
    if not records:
        return ""
    names = [f.name for f in dataclasses.fields(records[0])]
    return jsonl.dumps({n: getattr(r, n) for n in names} for r in records)


def canonical_release(release: str) -> str:
    """One name per release location: a local path made absolute (symlinks resolved), an S3 URI without a
    trailing slash. A plan continued from another folder reads the same clips, and ``rel`` and
    ``./rel/`` are the same release."""
    if storage.is_s3(release):
        return str(release).rstrip("/")
    return str(Path(release).resolve())


def _input_stamps(root: str, names: list[str]) -> dict[str, dict]:
    return {name: storage.stamp(storage.join(root, name)) for name in names}


def _claim(out: str, release: str, options: PrepareOptions) -> bool:
    """Bind ``out`` to (release, options) unless a run did so already. True if this run created the claim.

    The claim is a conditional create (``If-None-Match`` on S3, a hard link locally): of two runs started
    together, one creates it. A run with the same release and options then cooperates (every step is
    deterministic and written atomically); one with others is refused before it writes anything.
    """
    layout = DatasetLayout(out)
    mine = {"release": release, "options": options.as_json()}
    existing = _read_state(layout.claim)
    created = False
    if existing is None:
        record = {**mine, "by": f"{socket.gethostname()}:{os.getpid()}", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        created = storage.create_exclusive(layout.claim, jsonl.dump(record).encode())
        existing = record if created else _read_state(layout.claim)
    if existing is None:
        raise HablaError(f"{layout.claim}: unreadable; delete it (or use a new --out)")
    if {k: existing.get(k) for k in mine} != mine:
        raise HablaError(
            f"{out} is for another release or other options ({existing.get('release')}, {existing.get('options')}, "
            f"claimed by {existing.get('by', '?')} at {existing.get('at', '?')}); use a new --out"
        )
    return created


# The fields of plan.json that reusing or continuing a plan reads.
PLAN_FIELDS = ("version", "release", "root", "inputs", "options", "rows_read", "num_shards", "shards", "tar_shards")


def _read_state(uri: str, required: tuple[str, ...] = ()) -> dict | None:
    """A JSON state file this module wrote; None if absent. Raises HablaError if it is not what it should be."""
    try:
        value = jsonl.read_object(uri)
        missing = [k for k in required if value is not None and k not in value]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
    except ValueError as exc:
        raise HablaError(f"{uri}: corrupt ({exc}); delete the dataset folder's plan/ (or use a new --out)") from None
    return value


def _check_plan(existing: dict, out: str, release: str, options: PrepareOptions) -> None:
    """An existing plan is reused only for the same release and options, and only if the release has not
    changed since (its TSVs, or its archive: size and mtime / ETag)."""
    if existing.get("version") != PLAN_VERSION:
        raise HablaError(f"{out} was planned by another version of habla (plan version {existing.get('version')})")
    missing = [k for k in PLAN_FIELDS if k not in existing]
    if missing:
        raise HablaError(
            f"{DatasetLayout(out).plan}: corrupt (no {', '.join(missing)}); delete the dataset folder's plan/"
        )
    if existing["release"] != release or existing["options"] != options.as_json():
        raise HablaError(
            f"{out} holds data prepared from another release or with other options "
            f"({existing['release']}, {existing['options']}); use a new --out"
        )
    base = release if commonvoice.is_archive(release) else existing["root"]
    for name, recorded in existing["inputs"].items():
        uri = release if name == "." else storage.join(base, name)
        try:
            now = storage.stamp(uri)
        except FileNotFoundError:
            if storage.exists(DatasetLayout(out).report_json):
                continue  # the release was removed after the dataset was complete: nothing more to read
            raise HablaError(f"{uri}: gone since {out} was planned; cannot go on") from None
        if now != recorded:
            raise HablaError(
                f"{uri} changed since {out} was planned from it (size/mtime {recorded} -> {now}); "
                "prepare the new version into a new --out"
            )


def _has_clips(root: str) -> bool:
    clips = storage.join(root, "clips")
    if not storage.is_s3(root):
        return os.path.isdir(clips)
    return next(iter(storage.list_files(clips)), None) is not None


def plan(release: str, out: str, options: PrepareOptions) -> dict:
    """Step 1: locate (or unpack) the release, plan the shards, write ``<out>/plan``. Returns plan.json.

    If ``<out>`` already holds a plan made with the same release and options, it is returned unchanged.
    A release folder is checked before ``<out>`` is claimed, so bad input leaves ``<out>`` as it was. An
    archive is claimed before it is unpacked (into ``staging/``, left there to resume from); a run that fails
    frees the claim it created.
    """
    options.validate()
    label = commonvoice.release_label(release)
    release = canonical_release(release)
    layout = DatasetLayout(out)
    if storage.is_s3(out):
        storage.check_readable_root(out)  # one line for a missing bucket or endpoint (writes nothing)
    existing = _read_state(layout.plan)
    if existing is not None:
        _check_plan(existing, out, release, options)
        log.info("plan: %s already planned (%d shards), reusing it", out, existing["num_shards"])
        return existing

    storage.check_writable_root(out)
    archive = commonvoice.is_archive(release)
    # An archive is unpacked into <out>/staging: claimed first, so that a concurrent run with another archive
    # is refused instead of replacing the files this run is unpacking. A folder is checked before the claim.
    created = _claim(out, release, options) if archive else False
    try:
        skipped: dict = {}
        if archive:
            log.info("unpacking %s (one streaming read) into %s", release, layout.staging)
            storage.remove_stale_parts(storage.join(layout.staging, options.locale))
            staged = commonvoice.stage_archive(release, layout.staging, options.locale, audio.MAX_CLIP_BYTES)
            root, skipped, inputs = staged.root, staged.skipped, {".": staged.stamp}
        else:
            root, inputs = commonvoice.locate_release(release, options.locale), None
        if not _has_clips(root):
            raise HablaError(f"{root}: no clips/ folder (the release's audio); is the release complete?")
        for name in _tsvs_read(root, options):
            try:
                commonvoice.read_tsv(storage.join(root, name))  # the header; the rows are read when planning
            except FileNotFoundError:
                raise HablaError(f"{storage.join(root, name)}: no such TSV in the release") from None
        if not archive:
            created = _claim(out, release, options)
        return _make_plan(release, label, root, inputs, skipped, out, options)
    except BaseException:
        if created:  # nothing binding was written (plan.json is written last): free the folder again
            with contextlib.suppress(Exception):  # the original error is the one to report
                storage.delete(layout.claim)
        raise


def _guarded_splits(options: PrepareOptions) -> set[str]:
    """The evaluation splits whose rows guard another split: dev and test guard train, dev guards test."""
    return set(EVAL_SPLITS) if "train" in options.splits else {"dev"} if "test" in options.splits else set()


def _tsvs_read(root: str, options: PrepareOptions) -> list[str]:
    """The TSVs planning reads: each split's, and dev/test when they guard another split and exist."""
    names = ["validated.tsv" if s == "train" and options.train_source == "validated" else f"{s}.tsv"
             for s in options.splits]  # fmt: skip
    return names + [f"{s}.tsv" for s in sorted(_guarded_splits(options)) if s not in options.splits
                    and storage.exists(storage.join(root, f"{s}.tsv"))]  # fmt: skip


def _make_plan(
    release: str, label: str, root: str, inputs: dict | None, skipped: dict, out: str, options: PrepareOptions
) -> dict:
    layout = DatasetLayout(out)
    storage.remove_stale_parts(storage.join(out, "plan"))
    started = time.monotonic()
    result = build_plan(release, root, options, skipped)
    if inputs is None:
        inputs = _input_stamps(root, result.inputs)
    for k, shard in enumerate(result.shards):
        storage.write_text(layout.plan_shard(k), _jsonl(shard))
    tar_shards = sum(any(c.split == "train" for c in sh) for sh in result.shards) if "train" in options.splits else 0
    readers = options.world_size * LOADER_WORKERS
    if options.format == "tar" and tar_shards % readers:
        log.warning(
            "%d train tar shards is not a multiple of world size %d × %d loader workers: some workers would "
            "share shards (NeMo's tarred loaders want a multiple); omit --shards to size them", tar_shards,
            options.world_size, LOADER_WORKERS,
        )  # fmt: skip
    rejected = sorted(result.rejected, key=lambda r: (r.split, r.line, r.path, r.reason))  # = _rejection_order
    storage.write_text(layout.plan_rejected, _jsonl(rejected))
    summary = {
        "version": PLAN_VERSION,
        "release": release,
        "release_label": label,
        "root": result.root,
        "inputs": inputs,
        "options": options.as_json(),
        "rows_read": result.rows_read,
        "has_durations": result.has_durations,
        "num_shards": len(result.shards),
        # With --format tar the train split is written as tar shards 0..m-1 (dev/test stay WAV files).
        "tar_shards": {"train": tar_shards} if options.format == "tar" and "train" in options.splits else {},
        "shards": [
            {"clips": len(shard), "planned_seconds": round(sum(c.duration or DEFAULT_CLIP_SECONDS for c in shard), 3)}
            for shard in result.shards
        ],
        "planned_clips": sum(len(s) for s in result.shards),
        "rejected_at_plan": len(result.rejected),
    }
    # plan.json is written last: its presence means the plan is complete.
    storage.write_text(layout.plan, jsonl.dump(summary))
    log.info(
        "plan: %d rows read, %d clips in %d shards, %d rejected (%.1fs)",
        sum(result.rows_read.values()),
        summary["planned_clips"],
        len(result.shards),
        len(result.rejected),
        time.monotonic() - started,
    )
    return summary


def read_plan(out: str) -> dict:
    summary = _read_state(DatasetLayout(out).plan, PLAN_FIELDS)
    if summary is None:
        raise HablaError(f"{out}: no plan yet (run the plan step first)")
    return summary


# ---------------------------------------------------------------------------------------------- convert


@dataclass(frozen=True)
class _Task:
    clip: dict
    source: str
    target: str | None  # WAV destination; None: return the WAV bytes (tar shards are written by the parent)
    resume: bool


def _convert_one(task: _Task, options: PrepareOptions) -> tuple[dict, bytes | None]:
    """Convert one clip. Returns (manifest entry or rejection dict, WAV bytes for tar shards)."""
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
    try:
        data = storage.read_capped(task.source, audio.MAX_CLIP_BYTES)
    except FileNotFoundError:
        return rejected("missing_clip", "no such file in clips/")
    except storage.NotAFile as exc:
        return rejected("not_a_file", str(exc))
    except storage.TooLarge as exc:
        return rejected("too_large", str(exc))
    except PermissionError:
        return rejected("unreadable_clip", "permission denied")
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return rejected("name_too_long", "the file system refuses the name")
        raise  # a storage fault (I/O error, full disk): the run stops, nothing is recorded as bad data
    try:
        decoded = audio.load(data, clip["duration"], options.max_duration)
    except audio.AudioRejected as exc:
        return rejected(exc.reason, exc.detail)
    problem = duration_problem(decoded.duration, clip["text"], options) or audio.silence_problem(decoded)
    if problem:
        return rejected(*problem)
    wav = audio.encode_wav(decoded.mono)
    if task.target is None:
        return _entry(clip, None, decoded.duration), wav
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
    return {"split": clip["split"], "entry": entry}


def _worker(args: tuple[_Task, PrepareOptions]) -> tuple[dict, bytes | None]:
    return _convert_one(*args)


def _deterministic_tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    return info


def convert_shard(out: str, shard: int, workers: int | None = None) -> dict:
    """Step 2: convert the clips of one shard. Returns the shard's result (also written to ``shards/``).

    A complete shard is skipped. A shard that was started before (and killed) resumes: WAVs already
    written are kept, not converted again. Tar shards are built in a local temporary file and published
    whole, so a killed tar shard is rebuilt.
    """
    layout = DatasetLayout(out)
    result_uri = layout.shard_result(shard)
    done = _shard_result(out, shard)
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
            storage.remove_stale_parts(storage.join(out, "tarred" if split in tarred else "audio", split))
        storage.remove_stale_parts(storage.join(out, "shards"))
    else:
        storage.write_text(started_marker, "")
    tasks = [
        _Task(
            clip,
            storage.join(summary["root"], "clips", clip["path"]),
            None if clip["split"] in tarred else layout.wav(clip["split"], audio_name(clip)),
            resume,
        )
        for clip in clips
    ]

    started = time.monotonic()
    cpu_started = time.process_time()
    entries: dict[str, list[dict]] = {}
    rejected: list[dict] = []
    with contextlib.ExitStack() as stack, Progress(len(tasks), f"shard {shard}") as progress:
        # Tar shards are written as the clips arrive (in plan order, which is sorted by path) and uploaded
        # while the conversion goes on; they are published only if the whole shard succeeds.
        tars = {
            split: _open_tar_shard(stack, layout.tar(split, shard)) for split in tarred & {c["split"] for c in clips}
        }
        for record, wav in _map(_worker, [(t, options) for t in tasks], workers):
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
    for split in tars:
        storage.write_text(layout.tar_manifest(split, shard), jsonl.dumps(entries.get(split, [])))

    # The shard's manifest lines per split and its rejections, each sorted, so that assembly can merge
    # the shards as streams; the summary is written last and marks the shard complete.
    for split, split_entries in entries.items():
        split_entries.sort(key=lambda e: e["path"])
        storage.write_text(layout.shard_file(shard, f"{split}.jsonl"), jsonl.dumps(split_entries))
    rejected.sort(key=_rejection_order)
    storage.write_text(layout.shard_file(shard, "rejected.jsonl"), jsonl.dumps(rejected))
    result = {
        "shard": shard,
        "splits": {split: len(split_entries) for split, split_entries in sorted(entries.items())},
        "rejected": len(rejected),
        "audio_seconds": round(sum(e["duration"] for es in entries.values() for e in es), 3),
        "wall_seconds": round(time.monotonic() - started, 3),
        "parent_cpu_seconds": round(time.process_time() - cpu_started, 3),
        "workers": workers,
    }
    storage.write_text(result_uri, json.dumps(result))
    storage.delete(started_marker)
    return result


def _shard_result(out: str, shard: int) -> dict | None:
    """A converted shard's summary, or None if the shard is not complete (or its summary is unreadable)."""
    return _read_done(
        DatasetLayout(out).shard_result(shard),
        lambda r: isinstance(r.get("splits"), dict) and r.get("shard") == shard,
        "converting the shard again",
    )


def _read_done(uri: str, valid: Callable[[dict], bool], redo: str) -> dict | None:
    """The summary that marks a step done, or None: absent, or corrupt (logged; the step is ``redo``ne)."""
    try:
        value = jsonl.read_object(uri)
    except ValueError as exc:
        log.warning("%s: corrupt (%s); %s", uri, exc, redo)
        return None
    if value is not None and not valid(value):
        log.warning("%s: not a summary this version writes; %s", uri, redo)
        return None
    return value


def _rejection_order(r: dict) -> tuple:
    return r["split"], r["line"], r["path"], r["reason"]


def _map(fn, items: list, workers: int) -> Iterator:
    """Map in order over a process pool; in-process when one worker suffices (no fork cost)."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(
        max_workers=min(workers, len(items)), initializer=_die_with, initargs=(os.getpid(),)
    ) as pool:
        yield from pool.map(fn, items, chunksize=max(1, min(16, len(items) // (4 * workers))))


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


def _open_tar_shard(stack: contextlib.ExitStack, uri: str) -> tarfile.TarFile:
    """A tar stream into ``uri``, published when ``stack`` exits cleanly."""
    writer = stack.enter_context(storage.AtomicWriter(uri))
    # PAX: member names of any length and any Unicode (ustar stops at 100 bytes of ASCII-safe name)
    return stack.enter_context(tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT))


class _BytesReader:
    """Minimal file object over bytes for tarfile.addfile (avoids copying into a BytesIO)."""

    def __init__(self, data: bytes) -> None:
        self._view, self._pos = memoryview(data), 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else self._pos + size
        chunk = self._view[self._pos : end].tobytes()
        self._pos += len(chunk)
        return chunk


# --------------------------------------------------------------------------------------------- assemble


def assemble(out: str) -> dict:
    """Step 3: gather the shards into manifests, ``rejected.jsonl`` and the report. Returns report.json.

    The shards' sorted files are merged as streams (memory does not grow with the release). Everything is
    written to a local staging folder first and published only once the accounting balances; a complete
    assembly (its report.json, written last) is not redone. Raises HablaError if a shard has not been
    converted, or if a split ends up empty (after publishing, so that rejected.jsonl says why);
    AssertionError if the accounting of rows does not balance (a bug, never expected).
    """
    from habla.data import report

    layout = DatasetLayout(out)
    done = _read_report(out)
    if done is not None:
        log.info("assemble: %s already assembled", out)
        return _check_not_empty(done, out)
    summary = read_plan(out)
    shards = range(summary["num_shards"])
    results = [_shard_result(out, k) for k in shards]
    missing = [k for k, r in zip(shards, results) if r is None]
    if missing:
        raise HablaError(f"{len(missing)} shard(s) not converted yet (first: {missing[0]}); run the convert step")
    storage.remove_stale_parts(out)
    splits = summary["options"]["splits"]
    stats = {split: report.SplitStats() for split in splits}
    rejected_stats = report.RejectionStats()

    with _scratch_folder() as work:
        local = {}  # the shards' files, local (downloaded once from object storage)
        for k, result in zip(shards, results):
            for name in [f"{split}.jsonl" for split in result["splits"]] + ["rejected.jsonl"]:
                local[k, name] = work / "shards" / f"{k:05d}-{name}"
                storage.download_file(layout.shard_file(k, name), local[k, name])
        storage.download_file(layout.plan_rejected, work / "plan-rejected.jsonl")

        for split in splits:
            sources = [local[k, f"{split}.jsonl"] for k, r in zip(shards, results) if split in r["splits"]]
            _merge_lines(sources, work / f"{split}.json", key=lambda e: e["path"], observe=stats[split].add)
        rejection_sources = [work / "plan-rejected.jsonl"] + [local[k, "rejected.jsonl"] for k in shards]
        _merge_lines(rejection_sources, work / "rejected.jsonl", key=_rejection_order, observe=rejected_stats.add)

        rows_in = sum(summary["rows_read"].values())
        rows_out = sum(s.clips for s in stats.values()) + rejected_stats.total
        if rows_in != rows_out:
            raise AssertionError(f"accounting does not balance: {rows_in} rows read, {rows_out} accounted for")
        for split in splits:
            storage.upload_file(work / f"{split}.json", layout.manifest(split))
        storage.upload_file(work / "rejected.jsonl", layout.rejected)

    tarred = {}
    for split, count in summary["tar_shards"].items():
        if count > 0:
            manifests, tars = layout.tar_patterns(split, count)
            tarred[split] = {
                "num_shards": count,
                "manifest_filepath": storage.absolute(manifests),
                "tarred_audio_filepaths": storage.absolute(tars),
            }
    return _check_not_empty(report.write_report(out, summary, stats, rejected_stats, tarred), out)


def _read_report(out: str) -> dict | None:
    def valid(report: dict) -> bool:
        splits, rejected = report.get("splits"), report.get("rejected")
        return (
            isinstance(splits, dict)
            and isinstance(rejected, dict)
            and all(isinstance(v, dict) and isinstance(v.get("clips"), int) for v in splits.values())
        )

    return _read_done(DatasetLayout(out).report_json, valid, "assembling again")


def _check_not_empty(report: dict, out: str) -> dict:
    """A split without a single clip is bad input (no clips/, every clip silent ...), not a dataset."""
    empty = [split for split, v in report["splits"].items() if v["clips"] == 0]
    if empty:
        reasons = ", ".join(f"{k}: {v}" for k, v in report["rejected"].items()) or "no rows"
        raise HablaError(
            f"no clip of {'/'.join(empty)} passed the filters ({reasons}); every row is listed with its reason "
            f"in {DatasetLayout(out).rejected}"
        )
    return report


@contextlib.contextmanager
def _scratch_folder() -> Iterator[Path]:
    """A local temporary folder, removed afterwards; those that killed runs on this machine left are removed
    too (their name carries their process id)."""
    root = Path(tempfile.gettempdir())
    for old in root.glob("habla-assemble-*"):
        pid = old.name.split("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"habla-assemble-{os.getpid()}-") as tmp:
        yield Path(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _merge_lines(sources: list[Path], target: Path, key, observe) -> None:
    """Merge sorted JSON-lines files into ``target`` in ``key`` order, showing each record to ``observe``.

    Files are read line by line on ``\n`` only (``newline="\n"``); a record is never split on U+2028.
    """

    with contextlib.ExitStack() as stack, open(target, "w", encoding="utf-8", newline="\n") as sink:
        files = [stack.enter_context(open(path, encoding="utf-8", newline="\n")) for path in sources]
        streams = [((jsonl.loads_line(line), line) for line in f) for f in files]
        for record, line in heapq.merge(*streams, key=lambda item: key(item[0])):
            observe(record)
            sink.write(line)


def prepare(release: str, out: str, options: PrepareOptions, workers: int | None = None) -> dict:
    """All three steps in this process: plan, convert every shard, assemble. Returns report.json."""
    summary = plan(release, out, options)
    for k in range(summary["num_shards"]):
        convert_shard(out, k, workers)
    return assemble(out)
