"""``habla pipeline compile|run-local|submit``: the Kubeflow pipeline, compiled, run on this machine, or submitted.

Trailing ``key=value`` arguments: a key without a dot is a pipeline parameter (``num_shards=4``), a dotted
key is a training config override (``trainer.max_steps=300``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import tempfile
import time
from pathlib import Path

from habla import storage
from habla.errors import HablaError

# What run-local changes from the cluster defaults: CPU training inside the pipeline, a small model.
LOCAL_DEFAULTS = {
    "launcher": "local",
    "gpus_per_node": 0,
    "nodes": 1,
    "num_shards": 2,
    "workers_per_shard": os.cpu_count() or 1,
    "audio_format": "wav",
    "config": "tiny_ctc_char",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    compile_ = sub.add_parser("compile", help="compile the pipeline to IR YAML (upload it in the KFP UI)")
    compile_.add_argument("--out", required=True, metavar="FILE.yaml")
    image_arguments(compile_)

    local = sub.add_parser("run-local", help="run the whole pipeline on this machine through kfp.local")
    local.add_argument("--release", help="release to prepare (default: the bundled mini release)")
    local.add_argument("--out", required=True, metavar="DST", help="output folder or s3:// prefix")
    local.add_argument("--config", default=LOCAL_DEFAULTS["config"], help="model config (default %(default)s)")
    local.add_argument("--run-name", help="folder name under DST/runs/ (default: local-<time>)")
    local.add_argument("settings", nargs="*", metavar="key=value", help="pipeline parameters and config overrides")

    submit = sub.add_parser("submit", help="submit a run to a Kubeflow Pipelines endpoint")
    submit.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    submit.add_argument("--release", required=True, metavar="SRC", help="release URI (s3://...)")
    submit.add_argument("--out", required=True, metavar="DST", help="output prefix (s3://...)")
    submit.add_argument("--experiment", default="habla", help="KFP experiment (default %(default)s)")
    submit.add_argument("--run-name", help="KFP run name (default: habla-<release>-<time>)")
    image_arguments(submit)
    submit.add_argument("settings", nargs="*", metavar="key=value", help="pipeline parameters and config overrides")


def image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prep-image", help="image of the data and launcher steps (default: $HABLA_PREP_IMAGE)")
    parser.add_argument("--train-image", help="image of training and evaluation (default: $HABLA_TRAIN_IMAGE)")
    parser.add_argument("--conversion-parallelism", type=int, help="shards converted at once (default 16)")


def apply_image_settings(args: argparse.Namespace | None) -> None:
    """Put the images and fan-out chosen on the command line into the environment.

    Component images are fixed when the components are defined, so this must run before the first import
    of habla.components.
    """
    for option, variable in (
        ("prep_image", "HABLA_PREP_IMAGE"),
        ("train_image", "HABLA_TRAIN_IMAGE"),
        ("conversion_parallelism", "HABLA_CONVERSION_PARALLELISM"),
    ):
        value = getattr(args, option, None) if args else None
        if value is not None:
            os.environ[variable] = str(value)


def _load_pipeline(args: argparse.Namespace | None = None):
    """Import the pipeline module with the images and fan-out chosen on the command line."""
    apply_image_settings(args)
    from habla.pipelines import training_pipeline

    return training_pipeline


def pipeline_parameters(pipeline_func) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(pipeline_func.pipeline_func).parameters)


def parse_settings(settings: list[str], pipeline_func) -> tuple[dict, list[str]]:
    """Split ``key=value`` arguments into typed pipeline parameters and config overrides."""
    known = pipeline_parameters(pipeline_func)
    params: dict = {}
    overrides: list[str] = []
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HablaError(f"expected key=value, got {item!r}")
        if "." in key:
            overrides.append(item)
            continue
        if key not in known:
            raise HablaError(f"unknown pipeline parameter {key!r} (known: {', '.join(sorted(known))})")
        kind = known[key].annotation
        kind = {"int": int, "float": float, "str": str}.get(kind, kind) if isinstance(kind, str) else kind
        try:
            params[key] = kind(value) if kind in (int, float) else value
        except ValueError:
            raise HablaError(f"pipeline parameter {key} needs a {kind.__name__}, got {value!r}") from None
    return params, overrides


def format_metrics(metrics: dict) -> str:
    """A terminal table: overall WER/CER, then WER per gender, age and accent group."""
    lines = [
        f"WER {metrics['wer']:.4f}  CER {metrics['cer']:.4f}  on {metrics['utterances']} utterances "
        f"({metrics['hours']:.3f} h)"
    ]
    for key in ("by_gender", "by_age", "by_accent"):
        groups = metrics.get(key) or {}
        if not groups:
            continue
        lines.append(f"\n{key[3:]:<32} {'utts':>6} {'WER':>8} {'CER':>8}")
        for group, values in sorted(groups.items(), key=lambda kv: -kv[1]["utterances"]):
            lines.append(f"{group[:32]:<32} {values['utterances']:>6} {values['wer']:>8.4f} {values['cer']:>8.4f}")
    return "\n".join(lines)


def run_local(release: str | None, out: str, config: str, settings: list[str], run_name: str | None = None) -> dict:
    """Run the whole pipeline here through ``kfp.local`` (each step a subprocess of this Python).

    Returns the run's evaluation metrics.
    """
    from kfp import local

    from habla.prepare import DEFAULT_RELEASE

    pipeline = _load_pipeline().habla_pipeline
    params, overrides = parse_settings(settings, pipeline)
    run_name = run_name or time.strftime("local-%Y%m%d-%H%M%S")
    arguments = {**LOCAL_DEFAULTS, "config": config, **params}
    arguments.update(
        release_uri=release or DEFAULT_RELEASE,
        output_uri=storage.absolute(out),
        run_name=run_name,
        config_overrides=" ".join(filter(None, [arguments.get("config_overrides", ""), *overrides])),
    )
    storage.check_writable_root(out)
    if storage.is_s3(out):
        pipeline_root = tempfile.mkdtemp(prefix="habla-kfp-")
    else:
        pipeline_root = str(Path(out, "kfp-local").resolve())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root, raise_on_error=False)
    pipeline(**arguments)
    run = storage.join(out, "runs", run_name)
    try:
        metrics = json.loads(storage.read_text(storage.join(run, "eval", "metrics.json")))
    except FileNotFoundError:
        raise HablaError(
            f"the pipeline did not finish (see the step logs above; task outputs in {pipeline_root})"
        ) from None
    return {"run_dir": storage.absolute(run), "metrics": metrics}


def run(args: argparse.Namespace) -> int:
    if args.action == "compile":
        path = _load_pipeline(args).compile_pipeline(args.out)
        print(f"compiled {path}: upload it in the KFP UI (Pipelines > Upload pipeline) or use habla pipeline submit")
        return 0
    if args.action == "run-local":
        result = run_local(args.release, args.out, args.config, args.settings, args.run_name)
        print(f"\nrun {result['run_dir']}\n")
        print(format_metrics(result["metrics"]))
        return 0
    if args.action == "submit":
        return _submit(args)
    raise AssertionError(args.action)


def _submit(args: argparse.Namespace) -> int:
    from habla import commonvoice, kfp_api

    module = _load_pipeline(args)
    params, overrides = parse_settings(args.settings, module.habla_pipeline)
    params.update(release_uri=args.release, output_uri=args.out)
    if overrides:
        params["config_overrides"] = " ".join(filter(None, [params.get("config_overrides", ""), *overrides]))
    run_name = args.run_name or f"habla-{commonvoice.release_label(args.release)}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory() as tmp:
        package = module.compile_pipeline(str(Path(tmp, "habla-train.yaml")))
        ref = kfp_api.submit_run(args.host, package, params, args.experiment, run_name)
    print(ref.url)
    return 0
