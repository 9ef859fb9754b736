"""``habla evaluate``: transcribe a manifest with a .nemo model, or score transcripts made elsewhere
(``--predictions``); WER/CER with intervals, overall and by group."""

from __future__ import annotations

import argparse
import json

HELP = "transcribe a manifest with a .nemo model: WER/CER with intervals, overall, by group and by speaker"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help=".nemo model (local or s3://), or a folder: a pipeline's output (its best model), a run or training "
        "output folder",
    )
    parser.add_argument(
        "--predictions",
        metavar="MANIFEST",
        help="instead of --model: score these transcripts (a NeMo manifest with pred_text, and text unless "
        "--manifest gives the references) with habla's normalisation, intervals and breakdowns",
    )
    parser.add_argument(
        "--manifest", help="NeMo manifest to transcribe (local or s3://); with --predictions: the references"
    )
    parser.add_argument("--tars", metavar="PATTERN",
                        help="the tar shards of a --manifest in tarred form (habla prepare --format tar: report.json's "
                        "tarred.test.tarred_audio_filepaths); its clips are read out of them once")  # fmt: skip
    parser.add_argument("--out", required=True, help="output folder (local or s3://)")
    parser.add_argument("--batch-size", type=int, default=16, help="utterances per transcription batch (default 16)")
    parser.add_argument("--worst", type=int, default=20, help="worst utterances listed in report.md (default 20)")
    parser.add_argument("--decoder", choices=("rnnt", "ctc"),
                        help="the head reported (default: the model's own: rnnt for hybrids and transducers); a "
                        "hybrid's other head is scored too")  # fmt: skip
    parser.add_argument("--overlap-with", metavar="TSV|MANIFEST",
                        help="the checkpoint's training data (e.g. Common Voice 12 train.tsv): report the test clips, "
                        "speakers and sentences it holds, and the WER without them")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from habla.core.errors import HablaError

    if bool(args.model) == bool(args.predictions):
        raise HablaError("give --model (to transcribe --manifest) or --predictions (transcripts to score)")
    if args.model and not args.manifest:
        raise HablaError("--model needs --manifest: the utterances to transcribe and their references")
    if args.predictions:
        from habla.evaluation.evaluate import score_predictions

        metrics = score_predictions(args.predictions, args.out, args.manifest, worst=args.worst)
    else:
        from habla.evaluation.evaluate import evaluate

        metrics = evaluate(args.model, args.manifest, args.out, batch_size=args.batch_size, worst=args.worst,
                           decoder=args.decoder, overlap_with=args.overlap_with, tars=args.tars)  # fmt: skip
    keys = ("wer", "wer_ci", "cer", "cer_ci", "utterances", "hours", "rtfx", "device", "decoder", "heads", "overlap")
    print(json.dumps({k: metrics[k] for k in keys if k in metrics}, ensure_ascii=False))
    return 0
