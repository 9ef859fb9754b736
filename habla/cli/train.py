"""``habla train``: train a NeMo CTC model from a YAML config (one CPU process to multi-node DDP)."""

from __future__ import annotations

import argparse
import json

from habla.training import configs

HELP = "train a NeMo CTC model from a YAML config (one CPU process to multi-node DDP)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help=f"config name ({', '.join(configs.available())}) or YAML path")
    parser.add_argument(
        "--train-manifest",
        required=True,
        help="NeMo manifest (local or s3://); with --train-tars the _OP_0..N_CL_ manifest pattern",
    )
    parser.add_argument("--val-manifest", required=True, help="NeMo manifest for validation (local or s3://)")
    parser.add_argument("--out", required=True, help="output folder DST (local or s3://)")
    parser.add_argument(
        "--train-tars",
        help="tarred audio shards, e.g. 's3://b/data/tarred/train/audio__OP_0..7_CL_.tar' (streamed with Lhotse)",
    )
    parser.add_argument(
        "--init-from",
        metavar="MODEL",
        help="fine-tune from a .nemo (local or s3://) or a name in $HABLA_MODEL_STORE: CTC, hybrid RNNT/CTC (its CTC "
        "head) or transducer (its encoder); the vocabulary is changed if it differs",
    )
    parser.add_argument("--resume", action="store_true", help="continue from DST/checkpoints/last.ckpt if there is one")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.max_steps=300 model.optim.lr=0.003")  # fmt: skip  # noqa: E501


def run(args: argparse.Namespace) -> int:
    from habla.training.train import train

    summary = train(
        config=args.config,
        train_manifest=args.train_manifest,
        val_manifest=args.val_manifest,
        out=args.out,
        overrides=args.overrides,
        init_from=args.init_from,
        resume=args.resume,
        train_tars=args.train_tars,
    )
    if summary.get("written_by_this_rank"):
        print(json.dumps({k: v for k, v in summary.items() if k != "written_by_this_rank"}, indent=2))
    return 0
