"""``habla transcribe``: transcribe audio files, folders, globs or manifests with a .nemo model, any length.

Every input ends in transcripts.json or, with its reason, in rejected.jsonl (a FIFO, a device or a folder named as
a recording is rejected, never read); exit 2 only when nothing at all could be transcribed, or for a bad model.
"""

from __future__ import annotations

import argparse
import json

HELP = "transcribe audio files, folders, globs or manifests with a .nemo model (long recordings in windows)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="audio files, folders, glob patterns ('clips/*.mp3') or NeMo manifests; local or s3://. A name that "
        "exists is taken literally, glob characters and all; put -- before names that start with '-'",
    )
    parser.add_argument(
        "--model", required=True, help=".nemo model, CTC, hybrid RNNT/CTC or transducer (local or s3://)"
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DST",
        help="output folder (local or s3://): transcripts.json, summary.json, rejected.jsonl (inputs not "
        "transcribed, each with a reason)",
    )
    parser.add_argument("--decoder", choices=("rnnt", "ctc"),
                        help="the head of a hybrid RNNT/CTC model (default: the model's own, rnnt)")  # fmt: skip
    parser.add_argument("--timestamps", action="store_true", help="add NeMo's word timestamps (key 'word')")
    parser.add_argument("--confidence", action="store_true", help="add a confidence per word (key 'word_confidence')")
    parser.add_argument("--batch-size", type=int, default=8, help="audio windows per forward pass (default 8)")
    parser.add_argument(
        "--window",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds of audio whose output each window keeps (default 20)",
    )
    parser.add_argument(
        "--context",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds of audio the model also sees on each side of a window (default 4)",
    )


def run(args: argparse.Namespace) -> int:
    from habla.evaluation import transcribe, windows

    summary = transcribe.transcribe(
        args.model,
        args.inputs,
        args.out,
        batch_size=args.batch_size,
        timestamps=args.timestamps,
        confidence=args.confidence,
        window_s=windows.WINDOW_S if args.window is None else args.window,
        context_s=windows.CONTEXT_S if args.context is None else args.context,
        decoder=args.decoder,
    )
    print(json.dumps({k: summary[k] for k in ("files", "rejected", "audio_hours", "rtfx", "device")}))
    return 0
