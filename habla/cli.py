"""``habla <command> ...``: one CLI over the project's functions.

Each command lives in its own module, which provides ``add_arguments(parser)`` and ``run(args) -> int``.
Command modules import only light things at module level (argparse, dataclasses, habla.storage ...):
NeMo, torch and kfp are imported inside ``run`` so that ``habla --help`` and ``habla prepare`` start fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from habla import __version__, storage
from habla.errors import HablaError

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("habla.prepare", "Common Voice release -> 16 kHz WAV (or tar shards) + NeMo manifests + report"),
    "pipeline": ("habla.pipeline_cli", "The Kubeflow pipeline: compile it, run it here (kfp.local), or submit it"),
    "launch": ("habla.launch", "Run habla train as a TrainJob/PyTorchJob on a cluster, or torchrun here"),
    "watch": ("habla.watch", "submit the training pipeline once for each new Common Voice release in an inbox"),
    "schedule": ("habla.schedule", "create or update the KFP recurring run of the release watcher"),
    "compare": ("habla.compare", "compare runs (parameters, WER/CER, per group) from run folders or a KFP experiment"),
    "train": ("habla.train", "train a NeMo CTC model from a YAML config (one CPU process to multi-node DDP)"),
    "evaluate": ("habla.evaluate", "transcribe a manifest with a .nemo model: WER/CER overall and by group"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="habla", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"habla {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(command)
        command.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except HablaError as exc:
        print(f"habla {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # Storage and endpoint failures that survived the retries (botocore errors, a full disk): one line.
        if type(exc).__module__.startswith(("botocore", "boto3", "s3transfer")) or isinstance(exc, OSError):
            print(f"habla {args.command}: error: {storage.describe_error(exc)}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print(f"habla {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
