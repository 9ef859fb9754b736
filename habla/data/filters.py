"""The plan's row filters over whole columns: which TSV row becomes a clip and which is rejected, and the shards
the clips are dealt into. habla.data.plan runs them and writes the result; docs/layout.md lists the reasons.

The filters apply in a fixed order and the first that fails names the row: malformed row, unsafe path, name
too long, undecodable text, the text's own rejections, duplicate, leakage (eval_overlap, eval_speaker,
eval_sentence), then the duration table's (too short, too long, characters per second). The test split is scored
as the published anchors score it: a distinct test row that fails a filter of the text or of the duration table
is kept (unless the table gives it under 0.1 s or over 600 s), the filter named in its ``training_filter``. Every
row is decided in Arrow or numpy except the rare ones the column checks of habla.data.columns hand back to Python; the
result is the one the row-by-row planner of earlier versions gave, byte for byte
(``tests/data/plan_reference.py``, compared in ``tests/data/test_plan_columns.py`` and the hypothesis harness).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from habla.core import storage
from habla.core.errors import HablaError
from habla.data import columns, dataset, shards, tsv
from habla.data.dataset import DEFAULT_CLIP_SECONDS, EVAL_SPLITS, duration_problem
from habla.data.options import TEST_MAX_SECONDS, PrepareOptions

#: The fields of a planned clip (plan/shard-*.jsonl), in their order; the rejections' (plan/rejected.jsonl).
CLIP_FIELDS = ("split", "path", "text", "sentence", "client_id", "gender", "age", "accents", "locale", "line",
               "duration", "audio")  # fmt: skip
#: The test split's clips have one more: the training filter the clip fails ("" if none; see _filter).
TEST_CLIP_FIELDS = (*CLIP_FIELDS, "training_filter")
REJECTION_FIELDS = ("split", "path", "reason", "detail", "line")


def _indices(rows: np.ndarray) -> pa.Array:
    return pa.array(rows, pa.int64())


@dataclass
class Split:
    """A split's clips: rows of its TSV (``kept``: their row numbers among the TSV's sound rows)."""

    rows: tsv.Rows
    texts: pa.Array  # normalized, one per sound row
    kept: np.ndarray
    seconds: np.ndarray  # per clip: the duration table's, NaN where it has none
    audio: pa.Array  # per clip: the WAV name when not the default one, else ""
    marks: pa.Array | None = None  # test split only, per clip: the training filter it fails, else ""

    @property
    def paths(self) -> pa.Array:
        return self.rows.columns["path"].take(_indices(self.kept))

    def __post_init__(self) -> None:
        #: Each clip's seconds for balancing: the table's, or DEFAULT_CLIP_SECONDS.
        self.weights = np.where(np.isnan(self.seconds), DEFAULT_CLIP_SECONDS, self.seconds)
        self.durations = columns.json_numbers(self.seconds)  # as JSON writes them

    def jsonl(self, split: str, clips: np.ndarray) -> bytes:
        """JSON lines of these clips (plan/shard-*.jsonl), in the order given."""
        rows = _indices(self.kept[clips])
        values = {c: self.rows.columns[c].take(rows) for c in ("path", "sentence", "client_id", "gender", "age",
                                                              "accents", "locale")}  # fmt: skip
        values["text"] = self.texts.take(rows)
        values["line"] = columns.json_numbers(self.rows.lines[self.kept[clips]])
        values["duration"] = self.durations.take(_indices(clips))
        values["audio"] = self.audio.take(_indices(clips))
        if self.marks is not None:
            values["training_filter"] = self.marks.take(_indices(clips))
        fields = [("split", json.dumps(split, ensure_ascii=False)[1:-1], True)]
        for key in (CLIP_FIELDS if self.marks is None else TEST_CLIP_FIELDS)[1:]:
            quoted = key not in ("line", "duration")
            fields.append((key, columns.json_inner(values[key]) if quoted else values[key], quoted))
        return columns.json_lines(fields)


@dataclass
class Plan:
    """What the filters decided (habla.data.plan writes it under ``<out>/plan/``)."""

    root: str  # the locale folder the TSVs are read from
    options: PrepareOptions
    rows_read: dict[str, int]  # data rows per TSV read (the accounting base)
    has_durations: bool
    inputs: list[str]  # the files read, relative to root
    splits: dict[str, Split] = field(default_factory=dict)
    rejected: list[pa.Table] = field(default_factory=list)  # REJECTION_FIELDS
    shards: list[list[tuple[str, np.ndarray]]] = field(default_factory=list)  # per shard: (split, its clips) runs

    def shard_clips(self, k: int) -> int:
        return sum(len(clips) for _, clips in self.shards[k])

    def shard_seconds(self, k: int) -> float:
        """The planned seconds of shard k, summed in its order (as the row-by-row planner summed them)."""
        return sum(w for split, clips in self.shards[k] for w in self.splits[split].weights[clips].tolist())

    def shard_jsonl(self, k: int) -> bytes:
        return b"".join(self.splits[split].jsonl(split, clips) for split, clips in self.shards[k] if len(clips))

    def routing(self) -> dict[str, int]:
        """Clip name -> its shard (a clip is in one split at most: the splits' overlaps are rejected)."""
        return {path: k for k, runs in enumerate(self.shards) for split, clips in runs
                for path in self.splits[split].paths.take(_indices(clips)).to_pylist()}  # fmt: skip

    @property
    def rejected_count(self) -> int:
        return sum(t.num_rows for t in self.rejected)

    def rejected_jsonl(self) -> bytes:
        """plan/rejected.jsonl: sorted by split, line, path, reason (= habla.data.dataset.rejection_order)."""
        if not self.rejected_count:
            return b""
        table = pa.concat_tables(self.rejected)
        order = pc.sort_indices(table, sort_keys=[(k, "ascending") for k in ("split", "line", "path", "reason")])
        table = table.take(order)
        values = [(k, columns.json_inner(table[k]), True) for k in REJECTION_FIELDS[:-1]]
        return columns.json_lines(values + [("line", columns.json_numbers(table["line"].to_numpy()), False)])


def _rejections(split: str, paths, reasons, details, lines) -> pa.Table:
    def strings(values) -> pa.Array:
        return values if isinstance(values, pa.Array) else pa.array(values, pa.string())

    return pa.table({"split": pa.array([split] * len(lines), pa.string()), "path": strings(paths),
                     "reason": strings(reasons), "detail": strings(details),
                     "line": pa.array(lines, pa.int64())})  # fmt: skip


class _Tables:
    """The TSVs as planning reads them: each read once, its sentences normalized once."""

    def __init__(self, root: str, fast: bool) -> None:
        self.root, self.fast = root, fast
        self.read: dict[str, tsv.Rows] = {}
        self.normalized: dict[str, tuple[pa.Array, list[tuple]]] = {}
        self.cache: dict[str, tuple[str, str, str]] = {}  # sentences normalized one by one

    def rows(self, name: str) -> tsv.Rows:
        if name not in self.read:
            uri = storage.join(self.root, name)
            try:
                self.read[name] = tsv.read_rows(uri, fast=self.fast)
            except FileNotFoundError:
                raise HablaError(f"{uri}: no such TSV in the release") from None
        return self.read[name]

    def texts(self, name: str) -> tuple[pa.Array, list[tuple]]:
        """(normalized texts, "" where rejected; the rejections as (row, reason, detail))."""
        if name not in self.normalized:
            self.normalized[name] = columns.normalize(self.rows(name).columns["sentence"], self.cache)
        return self.normalized[name]


def build_plan(root: str, options: PrepareOptions, *, fast: bool = True) -> Plan:
    """Read the TSVs and decide, row by row, what becomes a clip and what is rejected (no audio is read).
    ``fast=False`` reads every table row by row (the readers' results are equal; tests compare them)."""
    tsv_of_split = {s: "validated" if s == "train" and options.train_source == "validated" else s
                    for s in options.splits}  # fmt: skip
    durations = tsv.read_durations(root, fast=fast)
    plan = Plan(root, options, {}, durations is not None, [durations.file] if durations is not None else [])
    tables = _Tables(root, fast)

    # Dev/test rows guard the train split even when they are not prepared themselves, and test guards dev.
    eval_paths: dict[str, pa.Array] = {}
    speakers, texts = [pa.array([], pa.string())], [pa.array([], pa.string())]
    guarded = guarded_splits(options)
    for split in EVAL_SPLITS:
        uri = storage.join(root, f"{split}.tsv")
        if split not in guarded or (split not in options.splits and not storage.exists(uri)):
            continue
        plan.inputs.append(f"{split}.tsv")
        rows = tables.rows(f"{split}.tsv")
        eval_paths[split] = columns.flat(rows.columns["path"])
        speakers.append(columns.flat(rows.columns["client_id"]).dictionary_decode())
        normalized, rejected = tables.texts(f"{split}.tsv")
        keep = np.ones(len(normalized), dtype=bool)
        keep[[k for k, _, _ in rejected]] = False
        texts.append(normalized.filter(pa.array(keep)))
    empty = pa.array([], pa.string())
    overlap = {  # a test clip stays in test (scored as the anchors score it) and leaves train and dev
        "train": ("dev/test", pa.concat_arrays([eval_paths.get(s, empty) for s in EVAL_SPLITS])),
        "dev": ("test", eval_paths.get("test", empty)),
    }
    guards = pc.unique(pa.concat_arrays(speakers)), pc.unique(pa.concat_arrays(texts))
    for name in list(tables.read):  # dev/test rows no split of this plan reads again
        if name not in {f"{t}.tsv" for t in tsv_of_split.values()}:
            del tables.read[name], tables.normalized[name]

    for split in options.splits:
        name = f"{tsv_of_split[split]}.tsv"
        if name not in plan.inputs:
            plan.inputs.append(name)
        plan.rows_read[name if tsv_of_split[split] == split else f"{name} (as {split})"] = tables.rows(name).count
    seconds = _durations(tables, list(dict.fromkeys(f"{t}.tsv" for t in tsv_of_split.values())), durations)
    for split in options.splits:
        name = f"{tsv_of_split[split]}.tsv"
        plan.splits[split] = _filter(plan, split, name, tables, overlap.get(split), guards, seconds[name])

    count = shards.shard_count([s.weights for s in plan.splits.values()], options)
    tarred = {"train"} & set(plan.splits) if options.format == "tar" else set()
    plan.shards = [[] for _ in range(count)]
    for split in sorted(set(plan.splits) - tarred):
        paths = plan.splits[split].paths
        ordered = shards.by_path(paths)  # a shard lists its clips of a split by path
        assigned = shards.balance(plan.splits[split].weights, ordered, count)[ordered]
        grouped = ordered[np.argsort(assigned, kind="stable")]
        bounds = np.searchsorted(np.sort(assigned), np.arange(count + 1))
        for k in range(count):
            plan.shards[k].append((split, grouped[bounds[k] : bounds[k + 1]]))
    for split in tarred:
        for k, clips in enumerate(shards.deal_tar_shards(plan.splits[split].paths, count, options.shard_seed)):
            plan.shards[k].append((split, clips))
    return plan


def _durations(tables: _Tables, names: list[str], durations: tsv.Durations | None) -> dict[str, np.ndarray]:
    """Each TSV's rows' seconds in the duration table (NaN: not there), looked up at once (the table's index of
    names is built once)."""
    counts = [len(tables.rows(n).lines) for n in names]
    if durations is None:
        return {n: np.full(c, np.nan) for n, c in zip(names, counts)}
    found = durations.lookup(pa.concat_arrays([tables.rows(n).columns["path"] for n in names]))
    bounds = np.cumsum([0, *counts])
    return {n: found[bounds[k] : bounds[k + 1]] for k, n in enumerate(names)}


def guarded_splits(options: PrepareOptions) -> set[str]:
    """The evaluation splits whose rows guard another split: dev and test guard train, test guards dev (a clip
    listed in both stays in test, which is scored as the published anchors score it)."""
    return set(EVAL_SPLITS) if "train" in options.splits else {"test"} if "dev" in options.splits else set()


class _Verdicts:
    """Each row's rejection, as a number into a list of (reason, detail): 0 while the row is kept."""

    def __init__(self, n: int) -> None:
        self.code = np.zeros(n, dtype=np.int32)
        self.pairs: list[tuple[str, str]] = [("", "")]
        self._numbers: dict[tuple[str, str], int] = {}

    def number(self, reason: str, detail: str) -> int:
        if (reason, detail) not in self._numbers:
            self._numbers[(reason, detail)] = len(self.pairs)
            self.pairs.append((reason, detail))
        return self._numbers[(reason, detail)]

    def live(self) -> np.ndarray:
        return self.code == 0

    def reject(self, where: np.ndarray, reason: str, detail: str = "") -> None:
        """Reject the rows of ``where`` that are still kept."""
        self.code[where & (self.code == 0)] = self.number(reason, detail)

    def reject_each(self, rows, reason_detail) -> None:
        for k, (reason, detail) in zip(rows, reason_detail):
            if self.code[k] == 0:
                self.code[k] = self.number(reason, detail)

    def table(self, rows: np.ndarray) -> tuple[pa.Array, pa.Array]:
        """(reasons, details) of these rows."""
        codes = pa.array(self.code[rows])
        return tuple(pa.array([p[i] for p in self.pairs], pa.string()).take(codes) for i in (0, 1))


def _filter(plan: Plan, split: str, name: str, tables: _Tables, overlap, guards, seconds: np.ndarray) -> Split:
    rows, options = tables.rows(name), plan.options
    path, sentence, client = (rows.columns[c] for c in ("path", "sentence", "client_id"))
    verdicts = _Verdicts(len(rows.lines))
    reject = verdicts.reject
    reject(~columns.safe_names(path), "unsafe_path", "clip path must be a plain, printable file name inside clips/")
    reject(columns.names_too_long(path), "name_too_long", f"clip name over {dataset.NAME_MAX} bytes")
    undecodable = columns.mask(pc.match_substring(sentence, "\ufffd"))
    texts, text_rejected = tables.texts(name)
    marks = None
    if split == "test":  # every distinct, decodable test clip is kept; the training filter it fails is noted
        texts, marks = _test_texts(sentence, texts, text_rejected, undecodable)
    else:
        reject(undecodable, "undecodable_text", "sentence is not valid UTF-8")
        verdicts.reject_each([k for k, _, _ in text_rejected], [(r, d) for _, r, d in text_rejected])
    reject(_repeated(path, np.flatnonzero(verdicts.live())), "duplicate", "clip listed more than once in this TSV")
    if overlap is not None:
        reject(columns.mask(pc.is_in(path, value_set=overlap[1])), "eval_overlap", f"clip also listed in {overlap[0]}")
    if split == "train" and options.train_source == "validated":
        reject(columns.mask(pc.is_in(client, value_set=guards[0])), "eval_speaker", "speaker also in dev/test")
        reject(columns.mask(pc.is_in(texts, value_set=guards[1])), "eval_sentence", "sentence also in dev/test")
    _reject_durations(seconds, texts, options, verdicts, marks)

    kept = verdicts.live()
    out = np.flatnonzero(~kept)
    reasons, details = verdicts.table(out)
    plan.rejected.append(_rejections(split, path.take(_indices(out)), reasons, details, rows.lines[out]))
    if rows.malformed:
        bad = rows.malformed
        plan.rejected.append(_rejections(split, [r.path for r in bad], ["malformed_row"] * len(bad),
                                         [r.detail for r in bad], [r.line for r in bad]))  # fmt: skip
    clips = np.flatnonzero(kept)
    marked = None if marks is None else pa.array(marks[clips].tolist(), pa.string())
    return Split(rows, texts, clips, seconds[clips], _audio_names(path.take(_indices(clips))), marked)


def _test_texts(sentence, texts: pa.Array, text_rejected: list[tuple], undecodable: np.ndarray):
    """The test split's texts and marks: a sentence that cannot be normalized is scored as written (lower-cased,
    its spaces collapsed: its characters count as errors), marked with its rejection; one that is not valid
    UTF-8 is marked ``undecodable_text`` (the first filter of the two)."""
    marks = np.full(len(texts), "", dtype=object)
    if text_rejected:
        rows = np.array([k for k, _, _ in text_rejected], dtype=np.int64)
        marks[rows] = [reason for _, reason, _ in text_rejected]
        where = np.zeros(len(texts), dtype=bool)
        where[rows] = True
        written = [" ".join(s.lower().split()) for s in columns.flat(sentence).take(_indices(rows)).to_pylist()]
        texts = pc.replace_with_mask(texts, pa.array(where), pa.array(written, pa.string()))
    marks[undecodable] = "undecodable_text"
    return texts, marks


def _repeated(path, live: np.ndarray) -> np.ndarray:
    """Rows among ``live`` whose path an earlier live row has (the later ones of each run are duplicates)."""
    out = np.zeros(len(path), dtype=bool)
    if len(live) < 2:
        return out
    values = path.take(_indices(live))
    order = pc.sort_indices(values).to_numpy()  # stable: equal paths in row order, the first one first
    ordered = values.take(pa.array(order))
    same = columns.mask(pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1)))
    out[live[order[1:][same]]] = True
    return out


def _reject_durations(seconds, texts, options: PrepareOptions, verdicts: _Verdicts, marks=None) -> None:
    """The duration table's filters, where the table has the clip: numpy finds the rows, and
    habla.data.dataset.duration_problem (the one rule planning and conversion share) words each rejection.
    ``marks`` (the test split's): a clip of at least MIN_CLIP_SECONDS is kept, the filter marked unless the
    clip's text failed one already; one over TEST_MAX_SECONDS is too long (conversion would not decode it all,
    and its seconds would swell the shard count)."""
    known = ~np.isnan(seconds) & verdicts.live()
    if not known.any():
        return
    shortest = max(options.min_duration, dataset.MIN_CLIP_SECONDS)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = pc.utf8_length(texts).to_numpy() / seconds
    ok = (seconds >= shortest) & (seconds <= options.max_duration)
    ok &= (options.min_chars_per_second <= rate) & (rate <= options.max_chars_per_second)
    bad = np.flatnonzero(known & ~ok)
    problems = []
    for k, text in zip(bad.tolist(), texts.take(_indices(bad)).to_pylist()):
        problem = duration_problem(float(seconds[k]), text, options)
        if problem is None:
            raise AssertionError(f"duration filters disagree on {float(seconds[k])!r} s, {text!r}")
        problems.append(problem)
    if marks is None:
        verdicts.reject_each(bad.tolist(), problems)
        return
    for k, problem in zip(bad.tolist(), problems):
        if seconds[k] < dataset.MIN_CLIP_SECONDS:
            verdicts.reject_each([k], [problem])
        elif seconds[k] > TEST_MAX_SECONDS:
            verdicts.reject_each([k], [("too_long", f"{seconds[k]:.2f}s > {TEST_MAX_SECONDS}s")])
        elif not marks[k]:
            marks[k] = problem[0]


def _audio_names(paths: pa.Array) -> pa.Array:
    """Each clip's WAV name when it is not the default one (habla.data.dataset.choose_audio_names), else ""."""
    plain = columns.plain_audio_names(paths)
    if plain.all():
        return pc.cast(pa.nulls(len(paths)), pa.string()).fill_null("")
    names = paths.to_pylist()
    chosen = dataset.choose_audio_names([p for p, ok in zip(names, plain) if not ok],
                                        {p for p, ok in zip(names, plain) if ok})  # fmt: skip
    return pa.array([chosen.get(p, "") for p in names], pa.string())
