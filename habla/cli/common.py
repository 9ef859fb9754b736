"""Arguments several commands share: the compile options of a pipeline (images, conversion fan-out)."""

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


def compile_options(args: argparse.Namespace) -> CompileOptions:
    return CompileOptions(args.prep_image, args.train_image, args.conversion_parallelism)
