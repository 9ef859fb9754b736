"""NeMo manifests for training and evaluation: read and check them, and make their audio local.

NeMo's classic data loaders read local audio files only. A manifest whose ``audio_filepath`` values are
``s3://`` URIs (``habla prepare --format wav`` into object storage) is therefore localised: its audio is
downloaded once into a cache (``$HABLA_CACHE``, default ``~/.cache/habla``; objects are immutable, so a
file already in the cache is reused) and the manifest is rewritten to point at it. Large training sets
should use tarred shards instead (``--format tar``), which NeMo streams from object storage through Lhotse
without a local copy; their manifests are only read here for checks and counts. The dev and test splits of such
a dataset are tarred too (a few objects per shard, not one per clip): for validation and evaluation each tar is
read once and its members extracted into the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tarfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from habla.core import jsonl, storage, untrusted
from habla.core.errors import HablaError, one_line
from habla.speech.models import cache_root

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("audio_filepath", "duration", "text")
DOWNLOAD_THREADS = 16
#: The largest tar member extracted (habla prepare converts clips of at most 32 MiB).
MAX_MEMBER_BYTES = 64 << 20
# NeMo's brace form for shard lists (`_OP_`/`_CL_` stand for braces, which shells and YAML mangle).
_SHARD_RANGE = re.compile(r"(?:_OP_|\{)(\d+)\.\.(\d+)(?:_CL_|\})")


def expand_shards(pattern: str) -> list[str]:
    """``.../audio__OP_0..2_CL_.tar`` (or ``{0..2}``) -> the three URIs; a pattern without a range -> itself."""
    match = _SHARD_RANGE.search(pattern)
    if not match:
        return [pattern]
    first, last = int(match[1]), int(match[2])
    if last < first:
        raise HablaError(f"{pattern}: empty shard range {first}..{last}")
    return [pattern[: match.start()] + str(k) + pattern[match.end() :] for k in range(first, last + 1)]


def parse_manifest(text: str, uri: str) -> list[dict]:
    """Parse JSON-lines manifest text; raise HablaError naming the first bad line."""
    entries = []
    for number, line in jsonl.lines(text):
        try:
            entry = jsonl.loads_line(line)
        except ValueError as exc:  # also NaN and Infinity, which are not JSON
            raise HablaError(f"{uri}: line {number} is not JSON ({getattr(exc, 'msg', exc)})") from None
        if not isinstance(entry, dict):
            raise HablaError(f"{uri}: line {number} is not a JSON object")
        missing = [k for k in REQUIRED_KEYS if k not in entry]
        if missing:
            raise HablaError(f"{uri}: line {number} lacks {', '.join(missing)}")
        duration = entry["duration"]
        if (
            not isinstance(entry["text"], str)
            or isinstance(duration, bool)
            or not isinstance(duration, (int, float))
            or not math.isfinite(duration)
            or duration <= 0
        ):
            raise HablaError(f"{uri}: line {number}: text must be a string and duration a positive finite number")
        entry["_line"] = number
        entries.append(entry)
    return entries


def read_manifest_text(uri: str) -> str:
    """A manifest's text; a missing or non-UTF-8 one is a one-line HablaError (storage faults propagate)."""
    try:
        return storage.read_text(uri)
    except FileNotFoundError:
        raise HablaError(f"{uri}: manifest not found") from None
    except UnicodeDecodeError:
        raise HablaError(f"{uri}: manifest is not UTF-8 text") from None


def read_manifest(uri: str) -> list[dict]:
    """All entries of a manifest (or of every shard of a ``_OP_0..N_CL_`` pattern); never empty.

    Each entry gets ``_line`` (its line number, for messages); :func:`write_manifest` drops it.
    """
    entries: list[dict] = []
    for shard in expand_shards(uri):
        try:
            text = read_manifest_text(shard)
        except HablaError:
            raise
        except Exception as exc:  # storage errors: endpoint down, access denied ...
            raise HablaError(f"{shard}: cannot read manifest ({one_line(exc, with_type=True)})") from None
        entries.extend(parse_manifest(text, shard))
    if not entries:
        raise HablaError(f"{uri}: manifest is empty")
    return entries


def write_manifest(entries: Iterable[dict], path: str | Path) -> None:
    storage.write_text(str(path), jsonl.dumps({k: v for k, v in e.items() if k != "_line"} for e in entries))


def resolve_audio(audio: str, manifest_uri: str) -> str:
    """A relative ``audio_filepath`` is relative to the manifest's folder (as in NeMo)."""
    if storage.is_s3(audio) or os.path.isabs(audio):
        return audio
    folder = manifest_uri.rsplit("/", 1)[0] if storage.is_s3(manifest_uri) else str(Path(manifest_uri).parent)
    return storage.join(folder, audio)


def _cache_path(uri: str, cache: Path) -> Path:
    bucket, key = storage.split_s3(uri)
    return cache / "audio" / bucket / key


def localize(
    entries: Sequence[dict], manifest_uri: str, cache: Path | None = None, tars: str | None = None
) -> list[dict]:
    """Entries whose ``audio_filepath`` is a local file that exists; ``s3://`` audio is downloaded.

    Entries in NeMo's tarred form (``audio_filepath`` the member name in tar shard ``shard_id``) are read out of
    ``tars`` (a tar URI or a ``_OP_0..N_CL_`` pattern): one streamed read per tar shard, not one request per clip.
    Every file is checked (a stat per local file; a download per missing S3 object), so a missing clip is
    reported now, in one line, and not as a traceback minutes into training.
    """
    cache = cache or cache_root()
    out = [dict(e) for e in entries]
    tarred = [e for e in out if "shard_id" in e]
    if tarred and not tars:
        raise HablaError(
            f"{manifest_uri}: line {tarred[0].get('_line', '?')} names a member of tar shard {tarred[0]['shard_id']!r} "
            "(shard_id): give the tar shards too (habla prepare's report.json lists them under tarred)"
        )
    if tarred:
        _unpack_tarred(tarred, tars, manifest_uri, cache)
    to_fetch = {}
    for entry in out:
        if "shard_id" in entry:  # a tar member, extracted above
            continue
        uri = entry["audio_filepath"] = resolve_audio(str(entry["audio_filepath"]), manifest_uri)
        if storage.is_s3(uri):
            local = _cache_path(uri, cache)
            entry["audio_filepath"] = str(local)
            if not (local.exists() and local.stat().st_size > 0):
                to_fetch[uri] = local

    failures: dict[str, str] = {}

    def fetch(item: tuple[str, Path]) -> None:
        uri, local = item
        try:
            storage.download_file(uri, local)
        except FileNotFoundError:
            failures[uri] = "not found"
        except Exception as exc:
            failures[uri] = one_line(exc, with_type=True)

    if to_fetch:
        log.info("downloading %d audio files into %s", len(to_fetch), cache / "audio")
        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            list(pool.map(fetch, to_fetch.items()))

    fetched_from = {str(local): uri for uri, local in to_fetch.items()}
    missing = []
    for entry in out:
        path = entry["audio_filepath"]
        source = fetched_from.get(path, path)
        if source in failures or not os.path.isfile(path):
            missing.append((entry.get("_line", "?"), source, failures.get(source, "no such file")))
    if missing:
        line, path, why = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise HablaError(f"{manifest_uri}: line {line}: audio {path}: {why}{more}")
    return out


def _unpack_tarred(entries: Sequence[dict], tars: str, manifest_uri: str, cache: Path) -> None:
    """Point each tarred entry at its member, extracted into the cache (once per tar shard's content: a tar that
    changes is extracted again)."""
    uris = expand_shards(tars)
    wanted: dict[int, set[str]] = {}
    for entry in entries:
        shard, name = entry["shard_id"], str(entry["audio_filepath"])
        if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < len(uris):
            raise HablaError(f"{manifest_uri}: line {entry.get('_line', '?')}: shard_id {shard!r} is not one of the "
                             f"{len(uris)} tar shard(s) {tars}")  # fmt: skip
        if not untrusted.is_plain_name(name):
            raise HablaError(f"{manifest_uri}: line {entry.get('_line', '?')}: tar member {name!r} is not a plain "
                             "file name")  # fmt: skip
        wanted.setdefault(shard, set()).add(name)

    def unpack(shard: int) -> tuple[Path, set[str]]:
        try:
            return _extract_members(uris[shard], wanted[shard], cache)
        except FileNotFoundError:
            raise HablaError(f"{uris[shard]}: tar shard not found") from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise HablaError(f"{uris[shard]}: not a readable tar shard ({one_line(exc, with_type=True)})") from None

    log.info("reading %d clip(s) out of %d tar shard(s) into %s", len(entries), len(wanted), cache / "tarred")
    with ThreadPoolExecutor(min(DOWNLOAD_THREADS, len(wanted))) as pool:
        unpacked = dict(zip(wanted, pool.map(unpack, wanted)))
    for entry in entries:
        folder, found = unpacked[entry["shard_id"]]
        if str(entry["audio_filepath"]) not in found:
            raise HablaError(f"{manifest_uri}: line {entry.get('_line', '?')}: {entry['audio_filepath']} is not a "
                             f"file in {uris[entry['shard_id']]}")  # fmt: skip
        entry["audio_filepath"] = str(folder / str(entry["audio_filepath"]))


def _extract_members(uri: str, names: set[str], cache: Path) -> tuple[Path, set[str]]:
    """Extract the tar at ``uri`` (streamed once) into its cache folder, keyed by the tar's URI and content stamp:
    its regular files of plain names up to MAX_MEMBER_BYTES (the tar is untrusted). Returns the folder and which
    of ``names`` it holds."""
    key = hashlib.sha256(json.dumps([storage.absolute(uri), storage.stamp(uri)]).encode()).hexdigest()[:24]
    folder = cache / "tarred" / key
    done = folder / ".complete"  # every regular member of the tar, once all of them are there
    if done.exists():
        return folder, set(done.read_text(encoding="utf-8").splitlines()) & names
    folder.mkdir(parents=True, exist_ok=True)
    found: dict[str, None] = {}  # in tar order; the first of two members of one name is kept
    with storage.open_stream(uri) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if (member.isfile() and untrusted.is_plain_name(member.name) and member.size <= MAX_MEMBER_BYTES
                    and member.name not in found):  # fmt: skip
                storage.write_bytes(str(folder / member.name), tar.extractfile(member).read())
                found[member.name] = None
    storage.write_text(str(done), "".join(f"{name}\n" for name in found))
    return folder, found.keys() & names


def check_audio_readable(entries: Sequence[dict], threads: int = DOWNLOAD_THREADS) -> None:
    """Check every file, in parallel: is it mono audio with finite samples?

    A header read per file (no decoding) for PCM; files of float samples, the only ones that can hold NaN or
    infinity, are read whole. A bad file anywhere in the manifest is reported now, in one line with its manifest
    line, and not as a traceback (or a model of NaNs) in the middle of training.
    """
    with ThreadPoolExecutor(threads) as pool:
        problems = [(e, why) for e, why in zip(entries, pool.map(audio_problem, entries)) if why]
    if problems:
        entry, why = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise HablaError(f"line {entry.get('_line', '?')}: {entry['audio_filepath']}: {why}{more}")


def audio_problem(entry: dict) -> str | None:
    """Why a manifest entry's (local) audio cannot be trained on, or None."""
    import numpy as np
    import soundfile

    path = entry["audio_filepath"]
    try:
        info = soundfile.info(path)
        if info.channels != 1:
            return f"{info.channels} channels: habla trains on mono audio (habla prepare down-mixes)"
        if info.subtype in ("FLOAT", "DOUBLE"):
            samples, _ = soundfile.read(path, dtype="float32")
            if not np.isfinite(samples).all():
                return "samples that are not finite numbers (NaN or infinity)"
    except Exception as exc:  # noqa: BLE001 - LibsndfileError, RuntimeError, OSError ...
        return f"not readable audio ({one_line(exc)})"
    return None


def check_tar_shards(tar_pattern: str, manifest_pattern: str) -> list[str]:
    """Every tar shard named by the pattern exists and there is one per manifest shard. Returns the URIs."""
    tars = expand_shards(tar_pattern)
    manifests = expand_shards(manifest_pattern)
    if len(tars) != len(manifests):
        raise HablaError(f"{len(tars)} tar shards ({tar_pattern}) but {len(manifests)} manifests ({manifest_pattern})")
    for uri in tars:
        try:
            present = storage.exists(uri)
        except Exception as exc:
            raise HablaError(f"{uri}: cannot reach ({one_line(exc, with_type=True)})") from None
        if not present:
            raise HablaError(f"{uri}: tar shard not found")
    return tars


def check_tar_sample(tar_uri: str, manifest_uri: str) -> None:
    """The first member of a tar shard is audio listed by its manifest shard (reads only the shard's first bytes)."""
    import io
    import tarfile

    import soundfile

    try:
        with storage.open_stream(tar_uri) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            member = next((m for m in tar if m.isfile()), None)
            data = tar.extractfile(member).read() if member else b""
    except (tarfile.TarError, OSError) as exc:
        raise HablaError(f"{tar_uri}: not a readable tar shard ({exc})") from None
    if member is None:
        raise HablaError(f"{tar_uri}: empty tar shard")
    listed = {str(e["audio_filepath"]) for e in read_manifest(manifest_uri)}
    if member.name not in listed:
        raise HablaError(
            f"{tar_uri}: member {member.name} is not in {manifest_uri} (audio_filepath must be the member name)"
        )
    try:
        soundfile.info(io.BytesIO(data))
    except Exception as exc:
        raise HablaError(f"{tar_uri}: member {member.name} is not readable audio ({one_line(exc)})") from None


def total_hours(entries: Iterable[dict]) -> float:
    return sum(float(e["duration"]) for e in entries) / 3600.0
