"""``habla prepare``: a Common Voice release → 16 kHz WAV (or NeMo tar shards), NeMo manifests, a report."""

from __future__ import annotations

import argparse
import os

from habla.core.errors import HablaError
from habla.data.options import BUNDLED_RELEASE, PrepareOptions

HELP = "Common Voice release -> 16 kHz WAV (or tar shards) + NeMo manifests + report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PrepareOptions()
    parser.add_argument(
        "--release",
        default=BUNDLED_RELEASE,
        metavar="SRC",
        help="extracted Common Voice locale folder, cv-corpus-*.tar.gz archive, or s3:// prefix "
        "(default: the bundled mini release)",
    )
    parser.add_argument("--out", required=True, metavar="DST", help="output folder or s3://bucket/prefix")
    parser.add_argument(
        "--shards",
        type=int,
        default=defaults.shards,
        help="number of shards (default: one per 20 h of audio; with --format tar rounded up to a multiple of "
        "--world-size × 8 loader workers)",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=defaults.world_size,
        metavar="N",
        help="GPUs (in all) of the training the tar shards are sized for (default %(default)s)",
    )
    parser.add_argument(
        "--shard-seed",
        type=int,
        default=defaults.shard_seed,
        metavar="SEED",
        help="seed of the shuffle of the train clips over the tar shards (default %(default)s)",
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="worker processes per shard (default: CPUs)"
    )
    parser.add_argument("--splits", default=",".join(defaults.splits), help="comma-separated (default %(default)s)")
    parser.add_argument(
        "--train-source",
        choices=("train", "validated"),
        default=defaults.train_source,
        help="train.tsv, or validated.tsv minus dev/test speakers, sentences and clips",
    )
    parser.add_argument(
        "--format",
        choices=("wav", "tar"),
        default=defaults.format,
        help="wav files, or every split as NeMo tarred shards (default %(default)s)",
    )
    parser.add_argument("--locale", default=defaults.locale, help="locale folder inside a corpus folder or archive")
    parser.add_argument("--min-duration", type=float, default=defaults.min_duration, metavar="S")
    parser.add_argument("--max-duration", type=float, default=defaults.max_duration, metavar="S")
    parser.add_argument("--min-chars-per-second", type=float, default=defaults.min_chars_per_second)
    parser.add_argument("--max-chars-per-second", type=float, default=defaults.max_chars_per_second)
    parser.add_argument(
        "--step",
        choices=("all", "plan", "convert", "assemble"),
        default="all",
        help="run one step only (what the pipeline's tasks do); default: all",
    )
    parser.add_argument("--shard", type=int, help="with --step convert: the shard to convert (default: all)")


def options_from_args(args: argparse.Namespace) -> PrepareOptions:
    return PrepareOptions(
        splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()),
        train_source=args.train_source,
        format=args.format,
        shards=args.shards,
        world_size=args.world_size,
        shard_seed=args.shard_seed,
        locale=args.locale,
        min_duration=args.min_duration,
        max_duration=args.max_duration,
        min_chars_per_second=args.min_chars_per_second,
        max_chars_per_second=args.max_chars_per_second,
    )


def run(args: argparse.Namespace) -> int:
    from habla.data import prepare, report
    from habla.data.dataset import read_plan

    options = options_from_args(args)
    options.validate()
    if args.workers is not None and args.workers < 1:
        raise HablaError("--workers must be >= 1")
    if args.step in ("all", "plan"):
        prepare.plan(args.release, args.out, options)
    if args.step in ("all", "convert"):
        summary = read_plan(args.out)
        shards = [args.shard] if args.shard is not None else range(summary["num_shards"])
        for k in shards:
            prepare.convert_shard(args.out, k, args.workers)
    if args.step in ("all", "assemble"):
        print(report.summary_table(prepare.assemble(args.out)))
    return 0
