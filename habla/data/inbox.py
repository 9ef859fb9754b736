"""Complete Common Voice releases in an inbox (a local folder or ``s3://bucket/prefix``), for the watcher.

What is a release
  The inbox is listed one level deep. A release is an archive ``cv-corpus-<ver>[-delta]-<date>-<locale>.tar.gz``
  or an extracted folder ``cv-corpus-<ver>-<date>[-<locale>]/`` that already holds ``validated.tsv`` or
  ``train.tsv`` (here or under ``<locale>/``; an extracted folder still being copied is skipped until its TSVs
  are there). Other locales and other names are ignored; an extracted folder wins over its archive.

Complete archives only
  An archive is ready only once it is complete: a ``<archive>.sha256`` sidecar exists (an uploader writes it
  last), or its size and mtime/ETag held from one look to the next and it reads to tar's end-of-archive
  blocks (for ``.tar.gz``, one streaming read of the whole archive per version of it). What was seen is
  recorded under ``STATE/arrivals/<release>.json``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
from dataclasses import dataclass

from habla.core import state, storage
from habla.core.errors import HablaError, one_line
from habla.data import commonvoice
from habla.speech.releases import ReleaseName, parse_release_name

log = logging.getLogger(__name__)

TSV_MARKERS = ("validated.tsv", "train.tsv")


@dataclass(frozen=True)
class Release:
    """A release found in the inbox: its parsed name and where it is (archive or extracted folder)."""

    name: ReleaseName
    uri: str


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _children(folder: str) -> list[tuple[str, bool]]:
    """The entries directly in a folder / under a key prefix: ``(uri, is_folder)``."""
    if not storage.is_s3(folder):
        if not os.path.isdir(folder):
            raise HablaError(f"{folder}: no such folder")
        with os.scandir(folder) as it:
            return sorted((os.path.join(folder, e.name), e.is_dir()) for e in it)
    bucket, key = storage.split_s3(folder)
    prefix = key.rstrip("/") + "/" if key else ""
    out = []
    try:
        pages = (
            storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        )
        for page in pages:
            out += [(f"s3://{bucket}/{p['Prefix'].rstrip('/')}", True) for p in page.get("CommonPrefixes", [])]
            out += [(f"s3://{bucket}/{o['Key']}", False) for o in page.get("Contents", []) if o["Key"] != prefix]
    except Exception as exc:  # noqa: BLE001 - botocore ClientError, EndpointConnectionError …
        raise HablaError(f"cannot list {folder}: {one_line(exc, with_type=True)}") from None
    return sorted(out)


def _has_tsvs(folder: str, locale: str) -> bool:
    return any(
        storage.exists(storage.join(base, tsv))
        for base in (folder, storage.join(folder, locale))
        for tsv in TSV_MARKERS
    )


def find_releases(inbox: str, locale: str) -> list[Release]:
    """The releases of ``locale`` in the inbox, by version; an extracted folder wins over its archive."""
    found: dict[str, Release] = {}
    for uri, is_folder in _children(inbox):
        base = storage.name(uri)
        # An archive extracts to cv-corpus-<ver>-<date>/<locale>/: the folder name carries no locale.
        parsed = parse_release_name(base)
        if parsed is not None and is_folder and not parsed.locale:
            parsed = dataclasses.replace(parsed, locale=locale)
        if parsed is None or parsed.locale != locale or parsed.archive == is_folder:
            continue
        if is_folder and not _has_tsvs(uri, locale):
            log.info("%s: no %s yet (still being copied?), skipped this time", uri, " or ".join(TSV_MARKERS))
            continue
        if is_folder or parsed.name not in found:
            found[parsed.name] = Release(parsed, uri)
    return sorted(found.values(), key=lambda r: r.name)


def _arrival_uri(state_uri: str, name: str) -> str:
    return storage.join(state_uri, "arrivals", f"{name}.json")


def archive_waiting(release: Release, state_uri: str, record: bool = True) -> str | None:
    """None when ``release`` is complete; else why it is waiting (see the module doc).

    A folder is complete once its TSVs are there (find_releases). An archive needs a ``.sha256`` sidecar,
    or the same size and mtime/ETag as at the previous look (recorded in ``STATE/arrivals/``, when
    ``record``) plus a readable end of archive; the end is read once per archive version (an incomplete one
    waits until it changes).
    """
    if not release.name.archive or storage.exists(release.uri + ".sha256"):
        return None
    try:
        stamp = storage.stamp(release.uri)
    except FileNotFoundError:
        return "gone since the inbox was listed"
    uri = _arrival_uri(state_uri, release.name.name)
    seen = state.read(uri, fallback="treated as absent")
    if seen is None or seen.get("stamp") != stamp:
        if record:
            state.write(uri, {"uri": release.uri, "stamp": stamp, "seen_at": _now()}, indent=2)
        return f"{stamp['size']} bytes, new or still growing: submitted once it has not changed by the next poll"
    if seen.get("complete"):
        return None
    if isinstance(seen.get("incomplete"), str):  # this very version was read to its end before
        return f"not a complete archive: {seen['incomplete']}"
    problem = commonvoice.check_archive_end(release.uri)
    if record:
        verdict = {"incomplete": problem} if problem else {"complete": True}
        state.write(uri, {**seen, **verdict, "checked_at": _now()}, indent=2)
    return f"not a complete archive: {problem}" if problem else None


def mark_complete(state_uri: str, release_name: str, uri: str) -> None:
    """An archive downloaded whole and verified (habla.data.mdc) needs no arrival check."""
    record = {"uri": uri, "stamp": storage.stamp(uri), "seen_at": _now(), "complete": True}
    state.write(_arrival_uri(state_uri, release_name), record, indent=2)
