"""``habla launch``: run ``habla train`` as a TrainJob / PyTorchJob on a cluster, or under torchrun here.

For operators; the pipeline's train steps call habla.kubeflow directly. Everything after ``--`` is passed to
``habla train`` unchanged, e.g.::

    habla launch --kind pytorchjob --image reg/habla-train:0.1.0 --namespace kubeflow --nodes 2 \\
        --gpus-per-node 4 --env AWS_ENDPOINT_URL=http://s3.example:9000 -- --config fastconformer_ctc_bpe \\
        --train-manifest s3://b/data/manifests/train.json --val-manifest s3://b/data/manifests/dev.json \\
        --out s3://b/runs/r1/model
    habla launch --kind trainjob ... --dry-run      # print the run's plan and the job as YAML, create nothing
    habla launch --kind local --nproc-per-node 2 -- --config tiny_ctc_char --train-manifest ... --out runs/x

On a cluster the run's plan (``habla train --dry-run`` for these nodes and GPUs: batch, accumulation, learning
rate, steps, cadence, loader memory) is computed first from the train manifest: a plan habla train would refuse
stops here, its lines go to standard error and into the job's ``habla.dev/plan`` annotation, and its node request
is what each pod asks for unless --cpu/--memory say otherwise (--no-plan: do not read the manifest).
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets

from habla.core.errors import HablaError
from habla.core.settings import parse_pairs
from habla.runs.parameters import DEFAULT_RUNTIME

HELP = "Run habla train as a TrainJob/PyTorchJob on a cluster, or torchrun here"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1].replace("``", "").replace("e.g.::", "e.g.:")
    parser.add_argument("--kind", choices=["trainjob", "pytorchjob", "local"], default="trainjob")
    parser.add_argument("--image", help="the training image (infra/Dockerfile.train); required on a cluster")
    parser.add_argument("--namespace", default="kubeflow")
    parser.add_argument("--name", help="job name (default: habla-train-<random>); reusing one adopts that job")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--nproc-per-node", type=int, help="processes per node (default: one per GPU, or 1)")
    parser.add_argument("--cpu", help="CPU request per node, e.g. 8 (default: the plan's)")
    parser.add_argument("--memory", help="memory request and limit per node, e.g. 32Gi (default: the plan's)")
    parser.add_argument("--no-plan", action="store_true", help="do not read the train manifest for the run's plan")
    parser.add_argument("--s3-secret", default="habla-s3-credentials", help="Secret with AWS_ACCESS_KEY_ID/…")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="non-secret setting")
    parser.add_argument("--label", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument(
        "--runtime", default=DEFAULT_RUNTIME, help="TrainJob's ClusterTrainingRuntime (default %(default)s: /dev/shm)"
    )
    parser.add_argument("--service-account", help="PyTorchJob pods' service account")
    parser.add_argument("--poll", type=float, default=15.0, help="seconds between status checks")
    parser.add_argument("--timeout", type=float, help="give up (and delete the job) after this many seconds")
    parser.add_argument("--keep", action="store_true", help="do not delete the job at the end")
    parser.add_argument("--dry-run", action="store_true", help="print the job as YAML and stop")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of habla train")


def run(args: argparse.Namespace) -> int:
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    if args.kind == "local":
        from habla.kubeflow import torchrun

        torchrun.run_local(
            train_args, nproc_per_node=args.nproc_per_node or 1, nnodes=args.nodes, timeout_s=args.timeout
        )
        return 0
    if not args.image:
        raise HablaError("--image is required on a cluster (build it with infra/build.sh)")
    from habla.kubeflow import follow, jobs

    launch = jobs.TrainLaunch(
        image=args.image,
        name=args.name or jobs.job_name(secrets.token_hex(8)),
        train_args=tuple(train_args),
        namespace=args.namespace,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        nproc_per_node=args.nproc_per_node,
        cpu=args.cpu,
        memory=args.memory,
        s3_secret=args.s3_secret or None,
        env=parse_pairs(args.env, "--env"),
        labels=parse_pairs(args.label, "--label"),
        runtime=args.runtime,
        service_account=args.service_account,
    )
    jobs.build_job(launch, args.kind)  # the job's own settings are checked before the plan reads the manifest
    if not args.no_plan:
        plan = _plan(train_args, args.nodes, args.gpus_per_node)
        launch = dataclasses.replace(
            launch,
            cpu=args.cpu or str(plan["node"]["cpu"]),
            memory=args.memory or plan["node"]["memory"],
            annotations={jobs.PLAN_ANNOTATION: jobs.plan_annotation(plan)},
        )
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(jobs.build_job(launch, args.kind), sort_keys=False), end="")
        return 0
    follow.run_on_cluster(launch, args.kind, poll_s=args.poll, timeout_s=args.timeout, keep=args.keep)
    return 0


def _plan(train_args: list[str], nodes: int, gpus_per_node: int) -> dict:
    """``habla train --dry-run`` of ``train_args`` on this world, its lines on standard error."""
    import sys

    from habla.cli import train
    from habla.training.command import plan_lines

    parser = _TrainArguments(prog="habla train")
    train.add_arguments(parser)
    plan = train.plan_of(parser.parse_args(train_args), nodes, gpus_per_node)
    for line in plan_lines(plan):
        print(line, file=sys.stderr)
    return plan


class _TrainArguments(argparse.ArgumentParser):
    """habla train's parser for the arguments after ``--``: a mistake is one line, as every launch error."""

    def error(self, message: str):  # noqa: ANN201 - argparse's signature
        raise HablaError(f"the arguments after -- (habla train's): {message} (or --no-plan)")
