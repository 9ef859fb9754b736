"""``habla publish``: upload a promoted model (model.nemo, its card, the verified ONNX export) to a Hugging Face-style
hub, as one commit; the repository is created if it does not exist."""

from __future__ import annotations

import argparse
import json
import os

HELP = "upload a promoted model (model.nemo, model card, ONNX) to the Hugging Face Hub or a self-hosted hub"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="SRC",
        help="a pipeline's output folder (its best model) or a promoted model's OUT/models/<run>/",
    )
    parser.add_argument("--repo", required=True, help="hub repository id, e.g. my-org/habla-es-ctc")
    parser.add_argument(
        "--endpoint", help="the hub's URL (default: $HF_ENDPOINT, else https://huggingface.co)", default=None
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding a write token (default: $HF_TOKEN, else the token `hf auth login` stored)",
    )
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--message", help="the commit message (default: habla: <run>)")


def run(args: argparse.Namespace) -> int:
    from habla.core.errors import HablaError
    from habla.ops.publish import publish

    token = None
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise HablaError(f"--token-file {args.token_file}: cannot read it ({exc.strerror})") from None
    done = publish(args.source, args.repo, endpoint=args.endpoint or os.environ.get("HF_ENDPOINT"), token=token,
                   private=args.private, message=args.message)  # fmt: skip
    print(json.dumps(done))
    return 0
