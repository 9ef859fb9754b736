"""``habla schedule``: create or update the KFP recurring run of the release watcher (or delete it)."""

from __future__ import annotations

import argparse
import json

from habla.cli.common import add_compile_arguments, add_kfp_access_arguments, compile_options
from habla.core.errors import HablaError
from habla.core.settings import parse_pairs

HELP = "create or update the KFP recurring run of the release watcher"
DEFAULT_NAME = "habla-release-watcher"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="Kubeflow Pipelines API URL (default: $KF_PIPELINES_ENDPOINT)")
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
    parser.add_argument(
        "--claims",
        choices=("s3", "lease", "auto"),
        default="auto",
        help="how the watcher claims a release: s3, lease (a Kubernetes Lease in its pod's namespace) or auto "
        "(default; see habla watch --help)",
    )
    parser.add_argument(
        "--service-account",
        help="account the watcher's runs run as (default: habla-pipeline-runner, whose Roles in manifests/ let it "
        "take Leases and submit runs; '' for the namespace's default)",
    )
    add_kfp_access_arguments(parser)
    parser.add_argument("--disable", action="store_true", help="create/keep the recurring run disabled")
    parser.add_argument("--delete", action="store_true", help="delete the recurring run instead")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything and print what would be scheduled (JSON: cron fields, days of the week, parameters) "
        "without contacting KFP",
    )
    add_compile_arguments(parser)


def watcher_params(args: argparse.Namespace) -> dict:
    """The watcher pipeline's parameters from the command line."""
    params = {
        "inbox": args.inbox,
        "state": args.state,
        "output_root": args.output_root,
        "experiment": args.experiment,
        "locale": args.locale,
        "training_params": json.dumps(parse_pairs(args.param, "--param", typed=True), sort_keys=True),
        "s3_endpoint_url": args.s3_endpoint_url,
        "mdc": args.mdc,
        "claims": args.claims,
    }
    if args.kfp_host_in_cluster:
        params["kfp_host"] = args.kfp_host_in_cluster
    return params


def run(args: argparse.Namespace) -> int:
    from habla.ops import schedule

    if args.delete:
        count = schedule.unschedule(
            host=args.host,
            namespace=args.namespace,
            name=args.name,
            experiment=args.watcher_experiment,
            token_file=args.token_file,
        )
        print(f"deleted {count} recurring run(s) named {args.name}")
        return 0
    missing = [f"--{n.replace('_', '-')}" for n in ("cron", "inbox", "state", "output_root") if not getattr(args, n)]
    if missing:
        raise HablaError(f"{', '.join(missing)} required (or --delete)")
    if args.dry_run:
        planned = schedule.plan(name=args.name, experiment=args.watcher_experiment, cron=args.cron,
                                params=watcher_params(args), compile_options=compile_options(args),
                                enabled=not args.disable)  # fmt: skip
        print(json.dumps(planned, indent=2, ensure_ascii=False))
        return 0
    ref = schedule.schedule(
        host=args.host,
        namespace=args.namespace,
        name=args.name,
        experiment=args.watcher_experiment,
        cron=args.cron,
        params=watcher_params(args),
        compile_options=compile_options(args, warn=True),
        enabled=not args.disable,
        token_file=args.token_file,
        service_account=args.service_account,
    )
    print(
        f"recurring run {args.name} {ref.action}: id {ref.recurring_run_id}, cron '{' '.join(args.cron.split())}', "
        f"pipeline version {ref.version_id}"
    )
    return 0
