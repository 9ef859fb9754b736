"""A release archive read once, as a stream, into what planning and conversion need: its tables (TSVs, duration
tables) staged as files under ``staging/<locale>/``, and every clip the plan lists appended to its shard's
bundle (habla.data.bundles). Object-store requests grow with the shards, not the clips: a clip no split lists
is never written anywhere.

Common Voice archives list the TSVs before the clips, so the plan is made when the first clip arrives and the
clips are routed as they stream by. An archive that lists a table planning reads after its first clip (another
packer) is read a second time to route the clips, said in one log line.

What the archive must be: members under ``<top>/<locale>/`` (``*.tsv``/``*.txt`` and ``clips/*``; names checked,
nothing lands outside the staging folder), no member twice, tar's end-of-archive blocks at the end (an archive cut
short is refused), and the SHA-256 of ``<archive>.sha256`` when there is one. Clips over the size cap are not
bundled (rejected as ``too_large`` when their shard converts). A staging is tied to the archive's content (size,
mtime or ETag, a hash of its index) and to the options; an archive found unusable is not read again until it
changes; an interrupted pass, run again, skips the bundle chunks it wrote whole.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from habla.core import state, storage, untrusted
from habla.core.errors import HablaError
from habla.data import bundles, commonvoice

log = logging.getLogger("habla.prepare")

STAGED = "_STAGED.json"  # a complete staging: which archive, for which options
STAGING = "_STAGING.json"  # a staging in progress (or failed), and the archive it comes from
_STAGED_FIELDS = {"root": str, "stamp": dict, "index_sha256": str, "clips": int, "shards": int, "options": str}
#: Tables whose late arrival (after the first clip) changes the plan: they are read a second time around.
PLANNING_TABLES = ("train.tsv", "dev.tsv", "test.tsv", "validated.tsv", *commonvoice.DURATION_FILES)
_WHOLE = 1 << 20  # a table this small is read whole before it is written (a member cut short leaves no trace)

#: Makes the plan from the staged tables: (clip name -> shard, number of shards). HablaError for bad tables.
Router = Callable[[str], tuple[dict[str, int], int]]


@dataclass
class Staged:
    """A complete staging (``_STAGED.json``)."""

    root: str  # the staged locale folder: its tables, and bundles/
    stamp: dict  # the archive's size and mtime / ETag when it was read
    index_sha256: str  # over every member's name, type, size and mtime: which content this was
    clips: int  # clip members the archive holds (bundled or not)
    shards: int  # the shards bundled
    options: str  # the options' fingerprint (the bundles follow the plan)


def archive_stamp(archive: str) -> dict:
    try:
        return storage.stamp(archive)
    except FileNotFoundError:
        raise HablaError(f"{archive}: no such archive") from None


def _sidecar_sha256(archive: str) -> str | None:
    """The SHA-256 in ``<archive>.sha256`` (``sha256sum`` format), if the uploader wrote one."""
    try:
        text = untrusted.read_capped(archive + ".sha256", 64 * 1024).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except (untrusted.NotAFile, untrusted.TooLarge, IsADirectoryError):
        raise HablaError(f"{archive}.sha256: not a checksum file") from None
    digest = (text.split() or [""])[0].lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise HablaError(f"{archive}.sha256: not a SHA-256 checksum")
    return digest


def staged(archive: str, staging: str, locale: str, options: str) -> Staged | None:
    """The complete staging of this very archive for these options under ``staging``, or None; reads only.
    HablaError when this very archive was found unusable before (not read again until it changes)."""
    stamp = archive_stamp(archive)
    folder = storage.join(staging, locale)
    done = state.read(storage.join(folder, STAGED), _STAGED_FIELDS, fallback="staged afresh")
    if done and done["stamp"] == stamp and done["options"] == options:
        return Staged(**{k: done[k] for k in _STAGED_FIELDS})
    marker = state.read(storage.join(folder, STAGING), fallback="staged afresh") or {}
    if marker.get("failed") and marker.get("stamp") == stamp and marker.get("archive") == archive:
        if marker.get("sha256") == _sidecar_sha256(archive) and marker.get("scope") in ("archive", options):
            raise HablaError(marker["failed"])
    return None


def stage(archive: str, staging: str, locale: str, options: str, max_clip_bytes: int, route: Router) -> Staged:
    """Stage the tables and bundle the listed clips of one locale of ``archive`` under ``staging/<locale>``
    (see the module doc); ``options``: the fingerprint of the options ``route`` plans with."""
    done = staged(archive, staging, locale, options)
    if done is not None:
        return done
    folder = storage.join(staging, locale)  # one folder per locale: runs for two locales never meet
    progress = {"archive": archive, "stamp": archive_stamp(archive), "sha256": _sidecar_sha256(archive),
                "options": options}  # fmt: skip
    marker_uri = storage.join(folder, STAGING)
    marker = state.read(marker_uri, fallback="staged afresh") or {}
    if {k: marker.get(k) for k in progress} != progress:  # another archive's files (or none): start afresh
        for info in storage.list_files(folder):
            storage.delete(info.uri)
        marker = progress
        state.write(marker_uri, marker)
    reading = _Pass(archive, folder, locale, max_clip_bytes, route, progress)
    try:
        result = reading.run(marker, lambda update: state.write(marker_uri, {**progress, **update}))
    except HablaError as exc:
        state.write(marker_uri, {**progress, "failed": str(exc), "scope": reading.failure_scope(options)})
        raise
    staged_record = Staged(storage.absolute(folder), progress["stamp"], result[0], result[1], result[2], options)
    state.write(storage.join(folder, STAGED), {"archive": archive, **asdict(staged_record)})
    storage.delete(marker_uri)
    return staged_record


class _Pass:
    """One archive's staging: the first read stages the tables and routes the clips; a second one routes them
    when tables came after clips."""

    def __init__(self, archive: str, folder: str, locale: str, max_clip_bytes: int, route: Router,
                 progress: dict) -> None:  # fmt: skip
        self.archive, self.folder, self.locale, self.max_clip_bytes = archive, folder, locale, max_clip_bytes
        self.route, self.stamp, self.sha256 = route, progress["stamp"], progress["sha256"]
        self.clips = 0
        self.planned = False  # the archive itself was whole: a failure from here on is the plan's

    def failure_scope(self, options: str) -> str:
        """Which later runs a failure stops: any ("archive": the archive is unusable), or those with these options
        (the plan failed on its tables)."""
        return options if self.planned else "archive"

    def run(self, marker: dict, record: Callable[[dict], None]) -> tuple[str, int, int]:
        """(index hash, clip members, shards)."""
        existing = {i.uri: i.size for i in storage.list_files(self.folder)}
        if marker.get("late") and marker.get("index_sha256"):  # tables after clips: read through before
            index, self.clips = marker["index_sha256"], marker["clips"]
        else:
            writer, index = self._first(existing)
            if writer is not None:  # routed as the clips came
                writer.finish()
                return index, self.clips, writer.shards
            for info in storage.list_files(bundles.folder(self.folder)):
                storage.delete(info.uri)  # chunks of a plan made before the last tables came
            existing = {}
            record({"late": True, "index_sha256": index, "clips": self.clips})
        self.planned = True
        if not self.clips:
            return index, 0, 0
        routing, shards = self.route(self.folder)
        writer = bundles.Writer(self.folder, shards, existing)
        if routing:
            log.info("%s lists tables after clips: reading it a second time to bundle the clips", self.archive)
            try:
                again = self._route(writer, routing)
            except BaseException:
                writer.abort()
                raise
            if again != index or archive_stamp(self.archive) != self.stamp:
                raise HablaError(f"{self.archive}: changed while it was being read; run again")
        writer.finish()
        return index, self.clips, shards

    def _first(self, existing: dict[str, int]) -> tuple[bundles.Writer | None, str]:
        """Stage the tables, count and check the clips, and route them once the first one arrives. Returns the
        writer (None: the clips still have to be routed) and the index hash."""
        tables: set[str] = set()
        seen: set[bytes] = set()  # clip names, by a 128-bit digest (a name each would take 3 times the memory)
        writer: bundles.Writer | None = None
        routing: dict[str, int] | None = None
        late = False
        try:
            members = _members(self.archive, self.locale, self.sha256)
            for member, name, tar in members:
                if name.startswith("clips/"):
                    clip = name[len("clips/") :]
                    digest = hashlib.blake2b(clip.encode("utf-8", "surrogateescape"), digest_size=16).digest()
                    if digest in seen:
                        raise _twice(self.archive, member.name)
                    seen.add(digest)
                    self.clips += 1
                    if routing is None and not late:
                        try:
                            routing, shards = self.route(self.folder)
                            writer = bundles.Writer(self.folder, shards, existing)
                        except HablaError:
                            late = True  # a table it needs may come later: planned after the pass
                    if writer is not None and not late:
                        _bundle(writer, routing, clip, member, tar, self.max_clip_bytes)
                    continue
                if name in tables:
                    raise _twice(self.archive, member.name)
                tables.add(name)
                if routing is not None and name in PLANNING_TABLES:
                    late = True
                target = storage.join(self.folder, name)
                if existing.get(target) != member.size:  # else staged whole by an interrupted run
                    _stage_table(tar, member, target)
            index = members.index
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if late and writer is not None:
            writer.abort()
            writer = None
        return writer, index

    def _route(self, writer: bundles.Writer, routing: dict[str, int]) -> str:
        members = _members(self.archive, self.locale, None)
        for member, name, tar in members:
            if name.startswith("clips/"):
                _bundle(writer, routing, name[len("clips/") :], member, tar, self.max_clip_bytes)
        return members.index


def _twice(archive: str, member: str) -> HablaError:  # tar lets a later copy win silently: which is the release's?
    return HablaError(f"{archive}: holds {member} twice; nothing was prepared from it")


def _bundle(writer: bundles.Writer, routing: dict[str, int], clip: str, member, tar, max_clip_bytes: int) -> None:
    shard = routing.get(clip)
    if shard is None:
        return  # no split lists it: not written anywhere
    if member.size > max_clip_bytes:
        writer.skip(shard, clip, "too_large", f"{member.size} bytes in the archive, more than {max_clip_bytes}")
        return
    writer.add(shard, clip, tar.extractfile(member).read())


def _stage_table(tar, member, target: str) -> None:
    source = tar.extractfile(member)
    if member.size <= _WHOLE:
        storage.write_bytes(target, source.read())
        return
    with storage.AtomicWriter(target) as out:
        shutil.copyfileobj(source, out, _WHOLE)


class _Reader:
    """A forward-only stream that hashes what passes through it (for a checksum sidecar)."""

    def __init__(self, stream, digest) -> None:
        self._stream, self.digest = stream, digest

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if self.digest is not None:
            self.digest.update(data)
        return data


class _Members:
    """The members of one locale an archive holds, streamed: (member, name under the locale folder, tar), with
    ``index`` (the hash of every member's name, type, size and mtime) once read through. HablaError for an
    archive that is not a whole release."""

    def __init__(self, archive: str, locale: str, sha256: str | None) -> None:
        self.archive, self.locale, self.sha256 = archive, locale, sha256
        self.index = ""

    def __iter__(self) -> Iterator[tuple[tarfile.TarInfo, str, tarfile.TarFile]]:
        archive = self.archive
        index = hashlib.sha256()
        top = None
        try:
            stream = untrusted.open_regular(archive)
        except (FileNotFoundError, untrusted.NotAFile) as exc:
            raise HablaError(f"{archive}: no such archive ({exc})") from None
        reader = _Reader(stream, hashlib.sha256() if self.sha256 else None)
        try:
            with stream, tarfile.open(fileobj=reader, mode="r|" if archive.endswith(".tar") else "r|gz") as tar:
                for member in tar:
                    tar.members = []  # stream mode keeps every TarInfo otherwise: millions of clips
                    index.update(
                        f"{member.name}\t{member.type!r}\t{member.size}\t{member.mtime}\n".encode("utf-8", "replace")
                    )
                    name = self._kept(member)
                    if name is None:
                        continue
                    if top not in (None, member.name.split("/")[0]):
                        raise HablaError(f"{archive}: holds two corpus folders with a '{self.locale}' locale "
                                         f"({top}, {member.name.split('/')[0]})")  # fmt: skip
                    top = member.name.split("/")[0]
                    yield member, name, tar
                problem = commonvoice.end_of_archive(tar)
        except (tarfile.TarError, EOFError) as exc:
            raise HablaError(f"{archive}: cannot read the archive ({exc})") from None
        if problem:
            raise HablaError(f"{archive}: incomplete archive: {problem}; nothing was prepared from it")
        if self.sha256 and reader.digest.hexdigest() != self.sha256:
            raise HablaError(f"{archive}: its SHA-256 differs from {archive}.sha256 (damaged or still arriving)")
        if top is None:
            raise HablaError(f"{archive}: holds no '{self.locale}' locale folder (<top>/{self.locale}/*.tsv)")
        self.index = index.hexdigest()

    def _kept(self, member: tarfile.TarInfo) -> str | None:
        """``<table>`` or ``clips/<clip>`` for a member of this locale kept; None for any other."""
        parts = member.name.split("/")
        if not member.isfile() or member.name.startswith("/") or ".." in parts or len(parts) < 3:
            return None
        if parts[1] != self.locale or not all(commonvoice.is_safe_clip_name(p) for p in parts[2:]):
            return None
        is_table = len(parts) == 3 and parts[2].endswith((".tsv", ".txt"))
        is_clip = len(parts) == 4 and parts[2] == "clips"
        if not (is_table or is_clip) or commonvoice.name_too_long(parts[-1]):
            return None
        return "/".join(parts[2:])


def _members(archive: str, locale: str, sha256: str | None) -> _Members:
    return _Members(archive, locale, sha256)
