"""``habla schedule``: a KFP recurring run of the release watcher pipeline, created or updated idempotently.

The watcher pipeline (``habla.pipelines.watcher_pipeline``) is uploaded as a version named by its content
hash; the recurring run ``--name`` in ``--watcher-experiment`` is created if missing, left alone if it
already matches (a second call changes nothing), and replaced if the cron, the parameters or the pipeline
version changed — so a new habla release never leaves the schedule on a stale version (kfp #11542).
It always runs with ``max_concurrency=1`` (two polls never overlap) and ``no_catchup=True`` (after a pause,
one poll, not one per missed slot).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

from habla.errors import HablaError
from habla.pipeline_cli import apply_image_settings, image_arguments

DEFAULT_NAME = "habla-release-watcher"
# robfig/cron (KFP's scheduler) with a seconds field: second minute hour day-of-month month day-of-week.
_FIELD = re.compile(r"^[0-9A-Za-z*?/,\-#LW]+$")


def validate_cron(cron: str) -> str:
    """The cron expression, normalized to single spaces; HablaError unless it has KFP's 6 fields."""
    cron = " ".join(cron.split())
    fields = cron.split(" ")
    if len(fields) == 5:
        raise HablaError(f"--cron {cron!r}: KFP crons have 6 fields, seconds first; did you mean '0 {cron}'?")
    if len(fields) != 6 or not all(_FIELD.match(f) for f in fields):
        raise HablaError(
            f"--cron {cron!r}: expected 6 fields 'second minute hour day-of-month month day-of-week', "
            "e.g. '0 0 6 * * *' (every day at 06:00)"
        )
    return cron


def watcher_params(args: argparse.Namespace) -> dict:
    """The watcher pipeline's parameters from the command line."""
    from habla.watch import parse_params

    params = {
        "inbox": args.inbox,
        "state": args.state,
        "output_root": args.output_root,
        "experiment": args.experiment,
        "locale": args.locale,
        "training_params": json.dumps(parse_params(args.param), sort_keys=True),
        "s3_endpoint_url": args.s3_endpoint_url,
        "mdc": args.mdc,
    }
    if args.kfp_host_in_cluster:
        params["kfp_host"] = args.kfp_host_in_cluster
    return params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="Kubeflow Pipelines API URL (default: $KF_PIPELINES_ENDPOINT)")
    parser.add_argument("--namespace", help="KFP user namespace (multi-user deployments)")
    parser.add_argument("--cron", help="6-field cron, seconds first, e.g. '0 0 6 * * *' (daily at 06:00)")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"recurring run name (default {DEFAULT_NAME})")
    parser.add_argument(
        "--watcher-experiment",
        default="habla-watcher",
        help="KFP experiment holding the watcher's own runs (default habla-watcher)",
    )
    parser.add_argument("--experiment", default="habla", help="KFP experiment of the training runs (default habla)")
    parser.add_argument("--inbox", help="folder or s3:// prefix where releases are dropped")
    parser.add_argument("--state", help="s3:// prefix for the watcher's claims and results")
    parser.add_argument("--output-root", help="the training runs' output_uri (datasets/, runs/<run>/, models/)")
    parser.add_argument("--locale", default="es", help="Common Voice locale to watch (default es)")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training pipeline parameter passed on by the watcher (repeatable)",
    )
    parser.add_argument(
        "--kfp-host-in-cluster",
        default="",
        help="KFP API address as seen from the watcher's pod (default: the in-cluster service)",
    )
    parser.add_argument("--s3-endpoint-url", default="", help="S3 endpoint as seen from the watcher's pod")
    parser.add_argument("--mdc", action="store_true", help="the watcher also asks the Mozilla Data Collective")
    parser.add_argument("--disable", action="store_true", help="create/keep the recurring run disabled")
    parser.add_argument("--delete", action="store_true", help="delete the recurring run instead")
    image_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from habla import kfp_api

    if args.delete:
        client = kfp_api.connect(args.host, namespace=args.namespace)
        count = kfp_api.delete_recurring_run(client, args.watcher_experiment, args.name)
        print(f"deleted {count} recurring run(s) named {args.name}")
        return 0
    missing = [f"--{n.replace('_', '-')}" for n in ("cron", "inbox", "state", "output_root") if not getattr(args, n)]
    if missing:
        raise HablaError(f"{', '.join(missing)} required (or --delete)")
    cron = validate_cron(args.cron)
    params = watcher_params(args)
    client = kfp_api.connect(args.host, namespace=args.namespace)
    apply_image_settings(args)
    from habla.pipelines import watcher_pipeline

    with tempfile.TemporaryDirectory(prefix="habla-schedule-") as tmp:
        package = watcher_pipeline.compile_pipeline(str(Path(tmp, "watcher_pipeline.yaml")))
        ref = kfp_api.ensure_recurring_run(
            client,
            package_path=package,
            name=args.name,
            experiment=args.watcher_experiment,
            cron=cron,
            params=params,
            max_concurrency=1,
            no_catchup=True,
            enabled=not args.disable,
        )
    print(
        f"recurring run {args.name} {ref.action}: id {ref.recurring_run_id}, cron '{cron}', "
        f"pipeline version {ref.version_id}"
    )
    return 0
