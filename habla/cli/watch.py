"""``habla watch``: submit the training pipeline once for each new Common Voice release in an inbox."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from habla.cli.common import add_compile_arguments, add_kfp_access_arguments, compile_options
from habla.core.settings import parse_pairs

HELP = "submit the training pipeline once for each new Common Voice release in an inbox"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inbox", required=True, help="folder or s3:// prefix where releases are dropped")
    parser.add_argument("--state", required=True, help="folder or s3:// prefix for the watcher's claims/results")
    parser.add_argument("--output-root", help="the training runs' output_uri (datasets/, runs/<run>/, models/)")
    parser.add_argument("--host", help="Kubeflow Pipelines API URL (default: $KF_PIPELINES_ENDPOINT)")
    parser.add_argument("--experiment", default="habla", help="KFP experiment of the training runs")
    parser.add_argument("--locale", default="es", help="Common Voice locale to watch (default es)")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra training pipeline parameter (repeatable), e.g. --param nodes=2",
    )
    parser.add_argument("--dry-run", action="store_true", help="report what would happen; write and submit nothing")
    parser.add_argument(
        "--package", metavar="FILE.yaml", help="compiled training pipeline to submit (default: compile habla's own)"
    )
    add_compile_arguments(parser)
    parser.add_argument("--lease", type=float, help="claim lease in seconds (default 900)")
    parser.add_argument(
        "--claims",
        metavar="s3|lease|auto",
        default="auto",  # checked by watch() in one line (a CronJob passes it through an env variable)
        help="how a release is claimed: s3 = conditional writes on the state store (checked first; a store that "
        "ignores them is refused), lease = a Kubernetes Lease, auto = s3 when the check passes, else the Lease "
        "(default auto)",
    )
    parser.add_argument(
        "--lease-namespace", help="namespace of the Leases (default: the pod's, else the kubeconfig context's)"
    )
    parser.add_argument(
        "--mdc",
        action="store_true",
        help="first ask the Mozilla Data Collective for the newest release and download it into "
        "the inbox if it is new (download needs MDC_API_KEY)",
    )
    parser.add_argument(
        "--resubmit",
        metavar="RELEASE",
        help="submit this release (e.g. cv-corpus-25.0-2026-03-09-es) anew although it was submitted before: its "
        "result is kept as result-<time>.json and the new run gets a run folder of its own",
    )
    add_kfp_access_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the decisions as JSON")


def run(args: argparse.Namespace) -> int:
    import functools

    from habla.kubeflow.watch import LEASE_SECONDS, REPORTED, watch
    from habla.pipelines.training_pipeline import compile_into

    decisions = watch(
        args.inbox,
        args.state,
        output_root=args.output_root,
        host=args.host,
        namespace=args.namespace,
        experiment=args.experiment,
        locale=args.locale,
        params=parse_pairs(args.param, "--param", typed=True),
        dry_run=args.dry_run,
        lease_seconds=LEASE_SECONDS if args.lease is None else args.lease,
        mdc=args.mdc,
        package=args.package or functools.partial(compile_into, options=compile_options(args)),
        claims=args.claims,
        lease_namespace=args.lease_namespace,
        token_file=args.token_file,
        resubmit=args.resubmit,
    )
    if args.json:
        print(json.dumps([asdict(d) for d in decisions], indent=2))
    else:
        shown = [d for d in decisions if d.action in REPORTED]
        for d in shown:
            extra = f"  run {d.run_id}  {d.url}" if d.run_id else (f"  {d.detail}" if d.detail else "")
            print(f"{d.action:<14} {d.release}{extra}")
        quiet = len(decisions) - len(shown)
        if not shown:
            print(f"nothing new in {args.inbox}" + (f" ({quiet} release(s) processed before)" if quiet else ""))
    return 1 if any(d.action == "failed" for d in decisions) else 0
