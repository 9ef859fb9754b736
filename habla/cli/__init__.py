"""habla: Common Voice Spanish to a trained, evaluated NeMo speech-recognition model (one CLI, ``habla <command>``).

Each command is a module of this package with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
These modules hold argparse only and import nothing heavy at module level: a command's own code (NeMo,
torch, kfp, numpy ...) is imported inside its ``run``, so ``habla --help`` starts fast and every command
starts in an image that lacks what the other commands need (the slim prep image has no omegaconf or torch).

Exit codes (habla.core.errors): 0 done, 2 bad input, 1 storage/network/OS fault, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from habla import __version__
from habla.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAULT,
    EXIT_INTERRUPTED,
    Fault,
    HablaError,
    RedactingFilter,
    one_line,
    redact,
)

COMMANDS = ("prepare", "train", "evaluate", "pipeline", "launch", "watch", "schedule", "compare")
COMMANDS += ("transcribe", "download", "publish")  # using a model; fetching a real release; handing a model on
# Top-level modules of the optional extras, and the extra that brings each (pyproject.toml).
EXTRAS = {
    **dict.fromkeys(("torch", "nemo", "lightning", "omegaconf", "jiwer", "sentencepiece", "lhotse"), "train"),
    **dict.fromkeys(("onnx", "onnxruntime", "huggingface_hub"), "train"),
    **dict.fromkeys(("kfp", "kfp_server_api", "kubernetes", "requests"), "pipeline"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="habla", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"habla {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"habla.cli.{name}")
        description = module.__doc__.split("\n\n")[0].replace("``", "")  # plain text, not reStructuredText
        command = sub.add_parser(name, help=module.HELP, description=description)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def _is_fault(exc: BaseException) -> bool:
    """Storage and endpoint failures that survived the retries (botocore errors, a full disk)."""
    return type(exc).__module__.startswith(("botocore", "boto3", "s3transfer")) or isinstance(exc, OSError)


def _line(exc: BaseException) -> str:
    """A habla error's message as one line, without secrets."""
    return redact(" ".join(str(exc).split()))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "httpx", "httpx2", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:  # no signed URL or token in any log line
        handler.addFilter(RedactingFilter())
    try:
        return int(args._run(args) or 0)
    except HablaError as exc:
        print(f"habla {args.command}: error: {_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Fault as exc:
        print(f"habla {args.command}: error: {_line(exc)}", file=sys.stderr)
        return EXIT_FAULT
    except KeyboardInterrupt:
        print(f"habla {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as exc:  # a command run where its extra is not installed (the slim image)
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"habla {args.command}: error: needs {exc.name}, which comes with habla[{extra}]: "
              f"pip install 'habla[{extra}]' (or use the image that has it)", file=sys.stderr)  # fmt: skip
        return EXIT_BAD_INPUT
    except Exception as exc:
        if _is_fault(exc):
            print(f"habla {args.command}: error: {one_line(exc, with_type=True)}", file=sys.stderr)
            return EXIT_FAULT
        raise
