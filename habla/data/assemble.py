"""Step 3 of ``habla prepare``: gather the converted shards into ``manifests/<split>.json``, ``rejected.jsonl``
and the dataset report, checking that every input row ended up in exactly one of them."""

from __future__ import annotations

import contextlib
import heapq
import logging
from pathlib import Path

from habla.core import jsonl, leftovers, state, storage
from habla.core.errors import HablaError
from habla.core.layout import DatasetLayout
from habla.data import report
from habla.data.dataset import read_plan, rejection_order, scratch_folder, shard_result

log = logging.getLogger("habla.prepare")


def assemble(out: str) -> dict:
    """Step 3: gather the shards into manifests, ``rejected.jsonl`` and the report. Returns report.json.

    The shards' sorted files are merged as streams (memory does not grow with the release). Everything is
    written to a local staging folder first and published only once the accounting balances; a complete
    assembly (its report.json, written last) is not redone. Raises HablaError if a shard has not been
    converted, or if a split ends up empty (after publishing, so that rejected.jsonl says why);
    AssertionError if the accounting of rows does not balance (a bug, never expected).
    """
    layout = DatasetLayout(out)
    done = _read_report(out)
    if done is not None:
        log.info("assemble: %s already assembled", out)
        return _check_not_empty(done, out)
    summary = read_plan(out)
    shards = range(summary["num_shards"])
    results = [shard_result(out, k) for k in shards]
    missing = [k for k, r in zip(shards, results) if r is None]
    if missing:
        raise HablaError(f"{len(missing)} shard(s) not converted yet (first: {missing[0]}); run the convert step")
    leftovers.remove_stale_parts(out)
    splits = summary["options"]["splits"]
    stats = {split: report.SplitStats() for split in splits}
    rejected_stats = report.RejectionStats()

    with scratch_folder() as work:
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
        _merge_lines(rejection_sources, work / "rejected.jsonl", key=rejection_order, observe=rejected_stats.add)

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
    """A complete assembly's report.json, or None (absent, or unreadable: assembled again)."""
    uri = DatasetLayout(out).report_json
    done = state.read(uri, {"splits": dict, "rejected": dict}, fallback="assembling again")
    splits = done["splits"].values() if done else ()
    if not all(isinstance(v, dict) and isinstance(v.get("clips"), int) for v in splits):
        log.warning("%s: not a report this version writes; assembling again", uri)
        return None
    return done


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
