"""``habla compare``: compare runs (parameters, WER/CER, per group) from run folders or a KFP experiment."""

from __future__ import annotations

import argparse
import os
import sys

from habla.cli.common import add_kfp_access_arguments
from habla.core.errors import HablaError
from habla.core.render import FORMATS

HELP = "compare runs (parameters, WER/CER, per group) from run folders or a KFP experiment"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dst", nargs="*", help="run output folders (local or s3://) to compare")
    parser.add_argument("--host", help="Kubeflow Pipelines API URL: compare the runs of --experiment")
    parser.add_argument("--experiment", help="KFP experiment whose runs to compare (with --host)")
    add_kfp_access_arguments(parser)
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    parser.add_argument(
        "--groups",
        default="gender",
        help="per-group WER columns: comma-separated among gender,age,accent, or 'none' (default gender)",
    )
    parser.add_argument("--plot", metavar="FILE.png", help="also draw WER and CER per run (and per group) to a PNG")
    parser.add_argument(
        "--curves",
        metavar="FILE.png",
        help="also draw each run's learning curves (training loss, validation WER by step) from its TensorBoard "
        "events (<run>/model/logs/) to a PNG",
    )


def run(args: argparse.Namespace) -> int:
    from habla.core import render
    from habla.ops import compare

    groups = compare.parse_groups(args.groups)
    if args.experiment and not (args.host or os.environ.get("KF_PIPELINES_ENDPOINT")):
        raise HablaError("--experiment needs --host (or KF_PIPELINES_ENDPOINT)")
    if not args.dst and not args.experiment:
        raise HablaError("give run output folders (habla compare DST …) or --host URL --experiment NAME")
    rows = compare.rows_from_folders(args.dst)
    if args.experiment:
        rows += compare.rows_from_kfp(args.host, args.experiment, args.namespace, args.token_file)
    if not rows:
        raise HablaError(f"experiment {args.experiment!r} has no runs")
    rows = compare.sort_rows(rows)
    columns = compare.columns_for(rows, groups, with_source=args.format in ("csv", "json"))
    print(render.table(rows, columns, args.format))
    measured_on = compare.test_sets(rows)
    if len(measured_on) > 1:  # on stderr: stdout stays a table (or CSV/JSON) a program can read
        print(f"habla compare: note: these runs were scored on {len(measured_on)} different test sets "
              f"({', '.join(measured_on)}): compare WERs within one test set only (rows are grouped by it)",
              file=sys.stderr)  # fmt: skip
    if args.plot:
        compare.plot(rows, groups, args.plot)
    if args.curves:
        compare.plot_curves(rows, args.curves)
    return 0
