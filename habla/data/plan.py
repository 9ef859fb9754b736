"""Step 1 of ``habla prepare``: read the release's TSVs, normalize the text, apply the row filters (malformed
rows, unsafe paths, text, duplicates, leakage, durations when the release has a duration table) and split the
remaining clips into N shards balanced by duration. Writes ``<out>/plan/`` (docs/layout.md).

The first run binds ``<out>`` to its release and options (``plan/claim.json``, habla.core.claims): a concurrent
run with the same ones cooperates, one with others is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import time
from pathlib import Path

from habla.core import claims, leftovers, state, storage
from habla.core.errors import HablaError
from habla.core.layout import DatasetLayout, OutputLayout
from habla.data import archive as archive_pass
from habla.data import commonvoice
from habla.data.dataset import CORRUPT_PLAN, PLAN_FIELDS, PLAN_VERSION
from habla.data.filters import Plan, build_plan, guarded_splits
from habla.data.options import PrepareOptions, fingerprint
from habla.data.shards import LOADER_WORKERS
from habla.speech import audio
from habla.speech.releases import release_label

log = logging.getLogger("habla.prepare")


def canonical_release(release: str) -> str:
    """One name per release location: a local path made absolute (symlinks resolved), an S3 URI without a
    trailing slash. A plan continued from another folder reads the same clips, and ``rel`` and
    ``./rel/`` are the same release."""
    if storage.is_s3(release):
        return str(release).rstrip("/")
    return str(Path(release).resolve())


def _input_stamps(root: str, names: list[str]) -> dict[str, dict]:
    """Each TSV read: its size and mtime (or ETag) and, for a local file, a SHA-256 of its content: a release
    rebuilt or copied with the same content (new file times) is the same release."""
    return {name: _content_stamp(storage.join(root, name)) for name in names}


def _content_stamp(uri: str) -> dict:
    stamp = storage.stamp(uri)
    if not storage.is_s3(uri):
        stamp["sha256"] = _sha256(uri)
    return stamp


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unchanged(uri: str, recorded: dict, now: dict) -> bool:
    """Whether an input holds what it held when the dataset was planned: the same stamp, or (local files) the
    same size and content whatever its times say."""
    if all(now.get(k) == recorded.get(k) for k in now):
        return True
    same_size = now.get("size") == recorded.get("size")
    return same_size and "sha256" in recorded and not storage.is_s3(uri) and _sha256(uri) == recorded["sha256"]


def _claim(out: str, release: str, options: PrepareOptions) -> bool:
    """Bind ``out`` to (release, options) unless a run did so already. True if this run created the claim.

    The claim is created once (habla.core.claims.claim: ``If-None-Match`` on S3, a hard link locally): of two
    runs started together, one creates it. A run with the same release and options then cooperates (every step
    is deterministic and written atomically); one with others is refused before it writes anything.
    """
    record = {"release": release, "options": options.as_json(), "by": f"{socket.gethostname()}:{os.getpid()}",
              "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    remedy = "delete it (or use a new --out)"
    held = claims.claim(DatasetLayout(out).claim, record, ("release", "options"), remedy=remedy)
    if not held.mine:
        holder = held.holder
        raise HablaError(
            f"{out} is for another release or other options ({holder.get('release')}, {holder.get('options')}, "
            f"claimed by {holder.get('by', '?')} at {holder.get('at', '?')}); use a new --out"
        )
    return held.created


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
        if not _unchanged(uri, recorded, now):
            raise HablaError(
                f"{uri} changed since {out} was planned from it (its content: size {recorded.get('size')} -> "
                f"{now.get('size')}{', another SHA-256' if 'sha256' in recorded else ''}); prepare the new version "
                "into a new --out, or give it a new release folder name"
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
    label = release_label(release)
    release = canonical_release(release)
    layout = DatasetLayout(out)
    if storage.is_s3(out):
        storage.check_readable_root(out)  # one line for a missing bucket or endpoint (writes nothing)
    existing = state.read(layout.plan, PLAN_FIELDS, remedy=CORRUPT_PLAN)
    if existing is not None:
        _check_plan(existing, out, release, options)
        log.info("plan: %s already planned (%d shards), reusing it", out, existing["num_shards"])
        return existing

    storage.check_writable_root(out)
    archive = commonvoice.is_archive(release)
    # An archive is staged into <out>/staging: claimed first, so that a concurrent run with another archive is
    # refused instead of replacing the files this run is writing. A folder is checked before the claim, and so is
    # an archive staged before (a run that failed on it fails again without writing anything).
    key = fingerprint(release, options)
    if archive and (ready := archive_pass.staged(release, layout.staging, options.locale, key)) is not None:
        _check_release(ready.root, options, has_clips=ready.clips > 0)
    created = _claim(out, release, options) if archive else False
    try:
        built: dict = {}
        if archive:
            log.info("reading %s once: its tables, and the clips each shard needs, into %s", release, layout.staging)
            leftovers.remove_stale_parts(storage.join(layout.staging, options.locale))

            def route(root: str) -> tuple[dict[str, int], int]:
                built["plan"] = build_plan(root, options)
                return built["plan"].routing(), len(built["plan"].shards)

            staged = archive_pass.stage(release, layout.staging, options.locale, key, audio.MAX_CLIP_BYTES, route)
            root, inputs, has_clips = staged.root, {".": staged.stamp}, staged.clips > 0
        else:
            root, inputs, has_clips = commonvoice.locate_release(release, options.locale), None, None
        _check_release(root, options, has_clips)
        if not archive:
            created = _claim(out, release, options)
        return _make_plan(release, label, root, inputs, out, options, built.get("plan"), bundled=archive)
    except BaseException:
        if created:  # nothing binding was written (plan.json is written last): free the folder again
            with contextlib.suppress(Exception):  # the original error is the one to report
                storage.delete(layout.claim)
        raise


def _write_shards(layout: DatasetLayout, result: Plan) -> None:
    """plan/shard-*.jsonl, two at a time (Arrow and the writes release the GIL: a second core is used)."""
    from concurrent.futures import ThreadPoolExecutor

    def write(k: int) -> None:
        storage.write_bytes(layout.plan_shard(k), result.shard_jsonl(k))

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="habla-plan") as pool:
        for done in pool.map(write, range(len(result.shards))):
            del done


def plan_into(output_uri: str, release: str, options: PrepareOptions) -> str:
    """Plan ``release`` into its dataset folder under a pipeline's output,
    ``<output_uri>/datasets/<release>-<fingerprint of release and options>``: runs that prepare the same release
    the same way share it, and an existing complete plan is reused. Returns the dataset folder."""
    dataset = OutputLayout(output_uri).dataset(release_label(release), fingerprint(release, options)).root
    plan(release, dataset, options)
    return dataset


def _check_release(root: str, options: PrepareOptions, has_clips: bool | None = None) -> None:
    """The locale folder has its clips/ and the TSVs planning reads, each with a Common Voice header (reads only
    the headers; HablaError). ``has_clips``: whether a staged archive held clips (None: look in ``root``)."""
    if not (_has_clips(root) if has_clips is None else has_clips):
        raise HablaError(f"{root}: no clips/ folder (the release's audio); is the release complete?")
    for name in _tsvs_read(root, options):
        try:
            commonvoice.read_header(storage.join(root, name))  # the rows are read when planning
        except FileNotFoundError:
            raise HablaError(f"{storage.join(root, name)}: no such TSV in the release") from None


def _tsvs_read(root: str, options: PrepareOptions) -> list[str]:
    """The TSVs planning reads: each split's, and dev/test when they guard another split and exist."""
    names = ["validated.tsv" if s == "train" and options.train_source == "validated" else f"{s}.tsv"
             for s in options.splits]  # fmt: skip
    return names + [f"{s}.tsv" for s in sorted(guarded_splits(options)) if s not in options.splits
                    and storage.exists(storage.join(root, f"{s}.tsv"))]  # fmt: skip


def _tar_shards(options: PrepareOptions, train_shards: int, shards: int) -> dict[str, int]:
    """How many tar shards each split is written as (none: WAV files)."""
    if options.format != "tar":
        return {}
    return {split: train_shards if split == "train" else shards for split in options.splits}


def _make_plan(release: str, label: str, root: str, inputs: dict | None, out: str, options: PrepareOptions,
               result: Plan | None, bundled: bool) -> dict:  # fmt: skip
    """Write ``plan/``: each shard's clips, the rejections, and plan.json last. ``result``: the plan an archive's
    pass routed its clips by (else it is made here); ``bundled``: the clips are in the staging's bundles."""
    layout = DatasetLayout(out)
    leftovers.remove_stale_parts(storage.join(out, "plan"))
    started = time.monotonic()
    result = result if result is not None else build_plan(root, options)
    if inputs is None:
        inputs = _input_stamps(root, result.inputs)
    _write_shards(layout, result)
    train = "train" in options.splits
    tar_shards = sum(any(s == "train" and len(c) for s, c in runs) for runs in result.shards) if train else 0
    readers = options.world_size * LOADER_WORKERS
    if options.format == "tar" and tar_shards % readers:
        log.warning(
            "%d train tar shards is not a multiple of world size %d × %d loader workers: some workers would "
            "share shards (NeMo's tarred loaders want a multiple); omit --shards to size them", tar_shards,
            options.world_size, LOADER_WORKERS,
        )  # fmt: skip
    storage.write_bytes(layout.plan_rejected, result.rejected_jsonl())
    summary = {
        "version": PLAN_VERSION,
        "release": release,
        "release_label": label,
        "root": result.root,
        "inputs": inputs,
        "options": options.as_json(),
        "rows_read": result.rows_read,
        "has_durations": result.has_durations,
        # where convert reads the clips: "bundles" (an archive's, staged per shard under root) or root/clips/
        "clip_source": "bundles" if bundled else "folder",
        "num_shards": len(result.shards),
        # With --format tar every split is written as tar shards: train as shards 0..m-1 (its clips shuffled over
        # them), dev and test as one tar per conversion shard (one PUT per shard, not per clip).
        "tar_shards": _tar_shards(options, tar_shards, len(result.shards)),
        "shards": [
            {"clips": result.shard_clips(k), "planned_seconds": round(result.shard_seconds(k), 3)}
            for k in range(len(result.shards))
        ],
        "planned_clips": sum(result.shard_clips(k) for k in range(len(result.shards))),
        "rejected_at_plan": result.rejected_count,
    }
    # plan.json is written last: its presence means the plan is complete.
    state.write(layout.plan, summary)
    log.info(
        "plan: %d rows read, %d clips in %d shards, %d rejected (%.1fs)",
        sum(result.rows_read.values()),
        summary["planned_clips"],
        len(result.shards),
        result.rejected_count,
        time.monotonic() - started,
    )
    return summary
