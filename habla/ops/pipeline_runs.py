"""Run the training pipeline: here, through ``kfp.local`` (``habla pipeline run-local``), or on a Kubeflow
Pipelines endpoint (``habla pipeline submit``).

Settings are ``key=value`` strings: a key without a dot is a pipeline parameter (``num_shards=4``), typed
by the pipeline's signature; a dotted key is a training config override (``trainer.max_steps=300``),
appended to the ``config_overrides`` parameter.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import time
from pathlib import Path

from habla.core import storage
from habla.core.errors import HablaError
from habla.core.layout import OutputLayout
from habla.core.settings import split_pair
from habla.data.commonvoice import release_label
from habla.data.options import BUNDLED_RELEASE
from habla.kubeflow.compile import CompileOptions

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


def parse_settings(settings: list[str], pipeline_func) -> dict:
    """``key=value`` settings as pipeline arguments: parameters typed by the pipeline's signature, dotted
    config overrides appended to ``config_overrides``."""
    known = inspect.signature(pipeline_func.pipeline_func).parameters
    params: dict = {}
    overrides: list[str] = []
    for item in settings:
        key, value = split_pair(item, "a pipeline setting")
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
    if overrides:
        params["config_overrides"] = " ".join(filter(None, [params.get("config_overrides", ""), *overrides]))
    return params


def run_local(
    out: str,
    settings: list[str] = (),
    *,
    release: str | None = None,
    config: str | None = None,
    run_name: str | None = None,
    pipeline_defaults: bool = False,
) -> dict:
    """Run the whole pipeline here through ``kfp.local`` (each step a subprocess of this Python).

    The parameters start from LOCAL_DEFAULTS, or with ``pipeline_defaults`` from the compiled pipeline's own
    defaults (what a cluster run gets: tar shards, fastconformer_ctc_bpe, the config's budget; ``launcher=local``
    is still needed to train here). Returns ``{"run_dir", "metrics"}``: the run's folder and its evaluation metrics.
    """
    from kfp import local

    from habla.pipelines.training_pipeline import build_pipeline

    pipeline = build_pipeline(CompileOptions())
    params = parse_settings(list(settings), pipeline)
    run_name = run_name or time.strftime("local-%Y%m%d-%H%M%S")
    arguments = {**({} if pipeline_defaults else LOCAL_DEFAULTS), **({"config": config} if config else {}), **params}
    arguments.update(release_uri=release or BUNDLED_RELEASE, output_uri=storage.absolute(out), run_name=run_name)
    storage.check_writable_root(out)
    if storage.is_s3(out):
        pipeline_root = tempfile.mkdtemp(prefix="habla-kfp-")
    else:
        pipeline_root = str(Path(out, "kfp-local").resolve())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root, raise_on_error=False)
    pipeline(**arguments)
    run = OutputLayout(out).run(run_name)
    try:
        metrics = json.loads(storage.read_text(run.eval.metrics))
    except FileNotFoundError:
        raise HablaError(
            f"the pipeline did not finish (see the step logs above; task outputs in {pipeline_root})"
        ) from None
    return {"run_dir": storage.absolute(run.root), "metrics": metrics}


def submit(
    host: str,
    release: str,
    out: str,
    settings: list[str] = (),
    *,
    experiment: str = "habla",
    run_name: str | None = None,
    compile_options: CompileOptions | None = None,
):
    """Compile the pipeline with ``compile_options`` and submit one run of it; returns its RunRef."""
    from habla.kubeflow import kfp_api
    from habla.pipelines import training_pipeline

    options = compile_options or CompileOptions()
    params = parse_settings(list(settings), training_pipeline.build_pipeline(options))
    params.update(release_uri=release, output_uri=out)
    run_name = run_name or f"habla-{release_label(release)}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory() as tmp:
        package = training_pipeline.compile_pipeline(str(Path(tmp, "habla-train.yaml")), options)
        return kfp_api.submit_run(host, package, params, experiment, run_name)
