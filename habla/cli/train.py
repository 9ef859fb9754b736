"""``habla train``: train a NeMo model from a YAML config, or fine-tune a checkpoint as it is (one CPU process
to multi-node DDP)."""

from __future__ import annotations

import argparse
import json

from habla.training import configs

HELP = "train a NeMo model from a YAML config, or fine-tune a checkpoint as it is (one CPU process to multi-node DDP)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"config name ({', '.join(configs.available())}) or YAML path; without it, "
                        "--init-from MODEL is fine-tuned as it is (its architecture, tokenizer and heads)")  # fmt: skip
    parser.add_argument(
        "--train-manifest",
        required=True,
        help="NeMo manifest (local or s3://); with --train-tars the _OP_0..N_CL_ manifest pattern",
    )
    parser.add_argument("--val-manifest", help="NeMo manifest for validation (local or s3://); required to train")
    parser.add_argument("--out", help="output folder DST (local or s3://); required to train")
    parser.add_argument(
        "--train-tars",
        help="tarred audio shards, e.g. 's3://b/data/tarred/train/audio__OP_0..7_CL_.tar' (streamed with Lhotse)",
    )
    parser.add_argument("--val-tars", help="the validation split's tar shards, when --val-manifest is in tarred form "
                        "(its clips are read out of them once, into the local cache)")  # fmt: skip
    parser.add_argument(
        "--init-from",
        metavar="MODEL",
        help="fine-tune a .nemo (local or s3://) or a name in $HABLA_MODEL_STORE: CTC, hybrid RNNT/CTC or transducer. "
        "Without --config: as it is (AdamW lr 1e-4, 10 epochs); with --config: its weights under that config's model",
    )
    parser.add_argument("--freeze-encoder-steps", type=int, metavar="N",
                        help="train only the heads for the first N optimizer steps (then the whole model)")  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="continue from DST/checkpoints/last.ckpt if there is one")
    plan = parser.add_argument_group("plan only (no model is built, no audio read)")
    plan.add_argument("--dry-run", action="store_true",
                      help="print the run's plan as JSON (batch, accumulation, LR, steps, cadence, node requests) and stop")  # fmt: skip  # noqa: E501
    plan.add_argument("--nodes", type=int, default=1, help="with --dry-run: nodes (default %(default)s)")
    plan.add_argument("--gpus-per-node", type=int, default=0, help="with --dry-run: GPUs per node (0: one CPU process)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.max_steps=300 model.optim.lr=0.003")  # fmt: skip  # noqa: E501


def run(args: argparse.Namespace) -> int:
    from habla.core.errors import HablaError

    if args.dry_run:
        print(json.dumps(plan_of(args, args.nodes, args.gpus_per_node), indent=2))
        return 0
    if not args.config and not args.init_from:
        raise HablaError("habla train needs --config NAME|PATH, or --init-from MODEL to fine-tune it as it is")
    if args.nodes != 1 or args.gpus_per_node != 0:
        raise HablaError("--nodes and --gpus-per-node go with --dry-run: a run reads its world from its launcher")
    missing = [f"--{name.replace('_', '-')}" for name in ("val_manifest", "out") if not getattr(args, name)]
    if missing:
        raise HablaError(f"habla train needs {' and '.join(missing)} (or --dry-run for the plan alone)")
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
        freeze_encoder_steps=args.freeze_encoder_steps,
        val_tars=args.val_tars,
    )
    if summary.get("written_by_this_rank"):
        print(json.dumps({k: v for k, v in summary.items() if k != "written_by_this_rank"}, indent=2))
    return 0


def plan_of(args: argparse.Namespace, nodes: int, gpus_per_node: int) -> dict:
    """The plan of the run these parsed ``habla train`` arguments describe on ``nodes`` × ``gpus_per_node``."""
    from habla.training.train import plan_run

    return plan_run(args.config, args.train_manifest, args.overrides, args.train_tars, nodes, gpus_per_node,
                    args.init_from, args.freeze_encoder_steps)  # fmt: skip
