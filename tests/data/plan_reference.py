"""The row-by-row planner of habla before its column filters (habla.data.filters), kept as the reference they
must equal byte for byte: each TSV row read by habla.data.commonvoice's row reader, checked by ``_check_row``,
dealt into shards by the original loops. Used by tests only (test_plan_columns.py, the hypothesis harness)."""

from __future__ import annotations

import hashlib
import heapq
import math
import random
from dataclasses import dataclass, field

from habla.core import jsonl, storage
from habla.core.errors import HablaError
from habla.data import commonvoice
from habla.data.dataset import DEFAULT_CLIP_SECONDS, EVAL_SPLITS, NAME_MAX, duration_problem, rejection_order
from habla.data.options import MAX_SHARDS, MIN_CLIP_SECONDS, TEST_MAX_SECONDS, PrepareOptions
from habla.data.shards import HOURS_PER_SHARD, LOADER_WORKERS
from habla.speech.text import TextRejected, normalize_text


@dataclass(slots=True)
class Clip:
    split: str
    path: str
    text: str
    sentence: str
    client_id: str
    gender: str
    age: str
    accents: str
    locale: str
    line: int
    duration: float | None = None
    audio: str = ""
    training_filter: str = ""  # test split only: the training filter the clip fails (it is kept all the same)


@dataclass(slots=True)
class Rejection:
    split: str
    path: str
    reason: str
    detail: str = ""
    line: int = 0


@dataclass
class ReferencePlan:
    rows_read: dict[str, int]
    inputs: list[str]
    shards: list[list[Clip]] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)

    def files(self) -> dict[str, bytes]:
        """What habla.data.plan writes from it: plan/shard-*.jsonl, plan/rejected.jsonl, and the summary's
        planned counts and seconds."""
        out = {f"shard-{k:05d}.jsonl": _jsonl(shard).encode() for k, shard in enumerate(self.shards)}
        order = sorted(self.rejected, key=lambda r: rejection_order(_record(r)))
        out["rejected.jsonl"] = _jsonl(order).encode()
        out["summary"] = repr(
            (
                self.rows_read,
                self.inputs,
                [(len(s), round(sum(c.duration or DEFAULT_CLIP_SECONDS for c in s), 3)) for s in self.shards],
                len(self.rejected),
            )  # fmt: skip
        ).encode()
        return out


def _record(r) -> dict:
    names = [n for n in r.__slots__ if n != "training_filter" or r.split == "test"]  # a test clip's field only
    return {n: getattr(r, n) for n in names}


def _jsonl(records) -> str:
    return jsonl.dumps(_record(r) for r in records)


def build_plan(root: str, options: PrepareOptions) -> ReferencePlan:
    tsv_of_split = {
        s: "validated" if s == "train" and options.train_source == "validated" else s for s in options.splits
    }
    durations = commonvoice.read_durations(root)
    plan = ReferencePlan({}, [])
    plan.inputs = (
        [f for f in commonvoice.DURATION_FILES if storage.exists(storage.join(root, f))][:1]
        if durations is not None
        else []
    )
    eval_paths: dict[str, set[str]] = {}
    eval_speakers: set[str] = set()
    eval_texts: set[str] = set()
    guarded = set(EVAL_SPLITS) if "train" in options.splits else {"test"} if "dev" in options.splits else set()
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
        "dev": ("test", eval_paths.get("test", set())),
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
            clip, rejection = _check_row(split, row, seen, overlap.get(split), eval_speakers, eval_texts, durations,
                                         options)  # fmt: skip
            if rejection:
                plan.rejected.append(rejection)
            else:
                clips.append(clip)
        plan.rows_read[f"{tsv}.tsv" if tsv == split else f"{tsv}.tsv (as {split})"] = rows
        name_audio(clips)
        clips_by_split[split] = clips
    count = shard_count(clips_by_split, options)
    tarred = {"train"} & set(clips_by_split) if options.format == "tar" else set()
    plan.shards = balance({s: c for s, c in clips_by_split.items() if s not in tarred}, count)
    for split in tarred:
        for shard, dealt in zip(plan.shards, deal_tar_shards(clips_by_split[split], count, options.shard_seed)):
            shard.extend(dealt)
    return plan


def _read_rows(uri: str):
    try:
        _, rows = commonvoice.read_tsv(uri)
    except FileNotFoundError:
        raise HablaError(f"{uri}: no such TSV in the release") from None
    return rows


def _check_row(split, row, seen, overlap, eval_speakers, eval_texts, durations, options):
    f = row.fields
    path, sentence = f["path"], f["sentence"]

    def reject(reason: str, detail: str = ""):
        return None, Rejection(split, path, reason, detail, row.line)

    if not commonvoice.is_safe_clip_name(path):
        return reject("unsafe_path", "clip path must be a plain, printable file name inside clips/")
    if len(path) > NAME_MAX // 4 and commonvoice.name_too_long(path):
        return reject("name_too_long", f"clip name over {commonvoice.NAME_MAX} bytes")
    test = split == "test"  # every distinct test clip of at least MIN_CLIP_SECONDS is kept, its filter noted
    failed = ""
    if "\ufffd" in sentence and not test:
        return reject("undecodable_text", "sentence is not valid UTF-8")
    try:
        text = normalize_text(sentence)
    except TextRejected as exc:
        if not test:
            return reject(exc.reason, exc.detail)
        text, failed = " ".join(sentence.lower().split()), exc.reason
    if test and "\ufffd" in sentence:
        failed = "undecodable_text"
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
    duration = durations.get(path) if durations is not None else None
    if duration is not None:
        reason = duration_problem(duration, text, options)
        if reason and (not test or duration < MIN_CLIP_SECONDS):
            return reject(*reason)
        if test and duration > TEST_MAX_SECONDS:
            return reject("too_long", f"{duration:.2f}s > {TEST_MAX_SECONDS}s")
        failed = failed or (reason[0] if reason else "")
    clip = Clip(split, path, text, sentence, f["client_id"], f.get("gender", ""), f.get("age", ""),
                f.get("accents", ""), f.get("locale", ""), row.line, duration, training_filter=failed)  # fmt: skip
    return clip, None


def _plain(path: str) -> bool:
    return path.endswith(".mp3") and path.isascii() and path.islower()


def name_audio(clips: list[Clip]) -> None:
    odd = [c for c in clips if not _plain(c.path)]
    if not odd:
        return
    plain = {c.path for c in clips if _plain(c.path)}

    def taken_by_plain(key: str) -> bool:
        return key.endswith(".wav") and f"{key[:-4]}.mp3" in plain

    taken: set[str] = set()
    for clip in sorted(odd, key=lambda c: c.path):
        head, dot, _ = clip.path.rpartition(".")
        name = f"{head if dot and head else clip.path}.wav"
        if name.casefold() in taken or taken_by_plain(name.casefold()) or commonvoice.name_too_long(name):
            stem = name[: -len(".wav")]
            short = stem.encode("utf-8")[:200].decode("utf-8", "ignore")
            digest = hashlib.sha256(clip.path.encode("utf-8")).hexdigest()
            n = 12
            name = f"{short}.{digest[:n]}.wav"
            while name.casefold() in taken or taken_by_plain(name.casefold()):
                n += 1
                name = f"{short}.{digest[:n]}.wav"
        taken.add(name.casefold())
        clip.audio = name


def balance(clips_by_split: dict[str, list[Clip]], shards: int) -> list[list[Clip]]:
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
    if options.shards is not None:
        return options.shards
    seconds = sum(c.duration or DEFAULT_CLIP_SECONDS for clips in clips_by_split.values() for c in clips)
    count = max(1, math.ceil(seconds / 3600 / HOURS_PER_SHARD))
    if options.format == "tar":
        readers = options.world_size * LOADER_WORKERS
        count = math.ceil(count / readers) * readers
        if count > MAX_SHARDS:
            raise HablaError(f"needs {count} tar shards, over the {MAX_SHARDS} allowed: give --shards")
    return count


def deal_tar_shards(clips: list[Clip], shards: int, seed: int) -> list[list[Clip]]:
    order = sorted(clips, key=lambda c: c.path)
    random.Random(seed).shuffle(order)
    count = min(shards, len(order))
    return [order[k::count] for k in range(count)] + [[] for _ in range(shards - count)]


def columns_files(plan) -> dict[str, bytes]:
    """The same files from habla.data.filters' plan."""
    out = {f"shard-{k:05d}.jsonl": plan.shard_jsonl(k) for k in range(len(plan.shards))}
    out["rejected.jsonl"] = plan.rejected_jsonl()
    out["summary"] = repr(
        (
            plan.rows_read,
            plan.inputs,
            [(plan.shard_clips(k), round(plan.shard_seconds(k), 3)) for k in range(len(plan.shards))],
            plan.rejected_count,
        )  # fmt: skip
    ).encode()
    return out
