"""Arguments several commands share: the compile options of a pipeline (images, conversion fan-out), and how to
reach a multi-user Kubeflow Pipelines API (token, namespace)."""

from __future__ import annotations

import argparse

from habla.kubeflow.compile import DEFAULT_CONVERSION_PARALLELISM, CompileOptions


def add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = CompileOptions()
    parser.add_argument(
        "--prep-image",
        default=defaults.prep_image,
        help="image of the data, glue and launcher steps (default %(default)s)",
    )
    parser.add_argument(
        "--train-image",
        default=defaults.train_image,
        help="image of training and evaluation (default %(default)s)",
    )
    parser.add_argument(
        "--conversion-parallelism",
        type=int,
        default=DEFAULT_CONVERSION_PARALLELISM,
        help="shards converted at once on a cluster (default %(default)s)",
    )


def add_kfp_access_arguments(parser: argparse.ArgumentParser, *, namespace: bool = True) -> None:
    """--token-file (and --namespace): what a multi-user KFP API needs (habla.kubeflow.kfp_auth)."""
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding a token for the audience pipelines.kubeflow.org (multi-user Kubeflow; re-read before "
        "each request). Default: $HABLA_KFP_TOKEN, else $KF_PIPELINES_SA_TOKEN_PATH or "
        "/var/run/secrets/kubeflow/pipelines/token when it exists, else (in a pod) a token requested for the "
        "pod's own service account",
    )
    if namespace:
        parser.add_argument(
            "--namespace", help="KFP user namespace (multi-user deployments; default: the pod's own in a cluster)"
        )


def compile_options(args: argparse.Namespace, *, warn: bool = False) -> CompileOptions:
    """The compile options of the command line; with ``warn`` (what makes a lasting artifact: a compiled package,
    a schedule) an image named by a tag is warned about on stderr."""
    import sys

    options = CompileOptions(args.prep_image, args.train_image, args.conversion_parallelism)
    for image in options.unpinned() if warn else ():
        print(f"habla: warning: image {image} is a tag, not a digest: a moved tag changes what runs; give "
              "…@sha256:<digest> (infra/build.sh prints them)", file=sys.stderr)  # fmt: skip
    return options
