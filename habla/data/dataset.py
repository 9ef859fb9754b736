"""A dataset being prepared, as its three steps share it (habla.data.plan, .convert, .assemble): the clips and
rejections the plan records, their WAV names, the filters applied both when planning (from the release's
duration table) and when converting (from the decoded audio), and the state files that say which step is done.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from habla.core import state
from habla.core.errors import HablaError
from habla.core.layout import DatasetLayout
from habla.data import commonvoice
from habla.data.options import MIN_CLIP_SECONDS, PrepareOptions

EVAL_SPLITS = ("dev", "test")
PLAN_VERSION = 2
NAME_MAX = commonvoice.NAME_MAX
# Weight of a clip when the release has no duration table (planning then balances clip counts).
DEFAULT_CLIP_SECONDS = 5.0
# The fields of plan.json that reusing or continuing a plan reads.
PLAN_FIELDS = ("version", "release", "root", "inputs", "options", "rows_read", "num_shards", "shards", "tar_shards")
CORRUPT_PLAN = "delete the dataset folder's plan/ (or use a new --out)"


def audio_name(clip: dict) -> str:
    """The WAV (or tar member) name of a planned clip: ``x.mp3`` -> ``x.wav`` unless the plan chose another."""
    audio, path = clip["audio"], clip["path"]
    if audio:
        return audio
    head, dot, _ = path.rpartition(".")
    return f"{head if dot and head else path}.wav"


def choose_audio_names(odd: list[str], plain: set[str]) -> dict[str, str]:
    """The WAV names of the clips of a split whose name is not plain (a lower-case ASCII ``.mp3``, as every
    Common Voice clip's): clip name -> WAV name, given the split's plain names (which keep their default).

    ``<stem>.wav`` unless another clip of the split already has that name (``x.mp3`` and ``x.wav``; names that
    differ only in case, for case-insensitive disks) or it would exceed the file-name limit; then
    ``<stem, cut>.<hash of the clip name>.wav``. Deterministic.
    """

    def taken_by_plain(key: str) -> bool:
        return key.endswith(".wav") and f"{key[:-4]}.mp3" in plain

    taken: set[str] = set()
    chosen = {}
    for path in sorted(odd):
        name = audio_name({"audio": "", "path": path})
        if name.casefold() in taken or taken_by_plain(name.casefold()) or commonvoice.name_too_long(name):
            stem = name[: -len(".wav")]
            short = stem.encode("utf-8")[:200].decode("utf-8", "ignore")
            digest = hashlib.sha256(path.encode("utf-8")).hexdigest()
            n = 12
            name = f"{short}.{digest[:n]}.wav"
            while name.casefold() in taken or taken_by_plain(name.casefold()):  # only for names made to collide
                n += 1
                name = f"{short}.{digest[:n]}.wav"
        taken.add(name.casefold())
        chosen[path] = name
    return chosen


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


def read_plan(out: str) -> dict:
    """``plan/plan.json``: the plan's parameters, inputs and shards. HablaError if there is none yet."""
    summary = state.read(DatasetLayout(out).plan, PLAN_FIELDS, remedy=CORRUPT_PLAN)
    if summary is None:
        raise HablaError(f"{out}: no plan yet (run the plan step first)")
    return summary


def shard_result(out: str, shard: int) -> dict | None:
    """A converted shard's summary, or None if the shard is not complete (or its summary is unreadable: it is
    converted again)."""
    uri = DatasetLayout(out).shard_result(shard)
    result = state.read(uri, {"shard": int, "splits": dict}, fallback="converting the shard again")
    return result if result is not None and result["shard"] == shard else None


def rejection_order(r: dict) -> tuple:
    return r["split"], r["line"], r["path"], r["reason"]


@contextlib.contextmanager
def scratch_folder() -> Iterator[Path]:
    """A local temporary folder for a step's work (a shard's downloaded bundle, assembly's merge), removed
    afterwards; those that killed runs on this machine left are removed too (their name carries their process
    id)."""
    root = Path(tempfile.gettempdir())
    for old in root.glob("habla-scratch-*"):
        pid = old.name.split("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"habla-scratch-{os.getpid()}-") as tmp:
        yield Path(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
