"""``habla prepare``: a Common Voice release → 16 kHz WAV (or NeMo tar shards) + NeMo manifests + a report.

Three steps, each a module and a plain function the KFP components call too:

1. habla.data.plan (:func:`plan`) reads the TSVs, normalizes the text, applies the row filters (malformed rows,
   unsafe paths, text, duplicates, leakage, durations when the release has a duration table) and splits the
   remaining clips into N shards balanced by duration. Writes ``plan/``.
2. habla.data.convert (:func:`convert_shard`) converts the clips of one shard with W worker processes
   (in-process MP3 decode, down-mix, soxr resample, PCM_16) and writes the audio plus
   ``shards/shard-<k>.json``. Shards are independent: on a cluster each is one KFP ParallelFor task.
3. habla.data.assemble (:func:`assemble`) gathers the shard results into ``manifests/<split>.json``,
   ``rejected.jsonl`` and the dataset report, and checks that every input row ended up in exactly one of them.

What the steps share (clips, filters, state files): habla.data.dataset.

Every file is written atomically and every step skips work that is already complete, so a re-run rewrites
nothing and a killed run, started again, ends exactly as an uninterrupted one. The first run binds ``<out>``
to its release and options (``plan/claim.json``, a conditional create: local or S3): a concurrent run with
the same ones cooperates, one with others is refused. See docs/layout.md.
"""

from __future__ import annotations

from habla.data.assemble import assemble
from habla.data.convert import convert_shard
from habla.data.options import PrepareOptions
from habla.data.plan import plan

__all__ = ["assemble", "convert_shard", "plan", "prepare"]


def prepare(release: str, out: str, options: PrepareOptions, workers: int | None = None) -> dict:
    """All three steps in this process: plan, convert every shard, assemble. Returns report.json."""
    summary = plan(release, out, options)
    for k in range(summary["num_shards"]):
        convert_shard(out, k, workers)
    return assemble(out)
