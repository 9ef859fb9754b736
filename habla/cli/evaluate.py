"""``habla evaluate``: transcribe a manifest with a .nemo model; WER/CER overall and by group."""

from __future__ import annotations

import argparse
import json

HELP = "transcribe a manifest with a .nemo model: WER/CER with intervals, overall, by group and by speaker"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=".nemo model (local or s3://)")
    parser.add_argument("--manifest", required=True, help="NeMo manifest to transcribe (local or s3://)")
    parser.add_argument("--out", required=True, help="output folder (local or s3://)")
    parser.add_argument("--batch-size", type=int, default=16, help="utterances per transcription batch (default 16)")
    parser.add_argument("--worst", type=int, default=20, help="worst utterances listed in report.md (default 20)")


def run(args: argparse.Namespace) -> int:
    from habla.evaluation.evaluate import evaluate

    metrics = evaluate(args.model, args.manifest, args.out, batch_size=args.batch_size, worst=args.worst)
    keys = ("wer", "wer_ci", "cer", "cer_ci", "utterances", "hours", "rtfx", "device")
    print(json.dumps({k: metrics[k] for k in keys}, ensure_ascii=False))
    return 0
